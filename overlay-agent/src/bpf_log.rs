//! The programs' own log records (aya-log), forwarded into the agent's tracing output.
//!
//! The programs log through a ring buffer (`AYA_LOGS`) behind a level the agent sets at
//! load time (the `AYA_LOG_LEVEL` global). The global lives in read-only data that is
//! frozen at load, so with logging off the verifier removes the logging code: the
//! datapath pays nothing for it. With it on, each record becomes one tracing event
//! with target `bpf`.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{Level, Log, Metadata, Record};
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// How much the programs log. Drops are logged at `debug`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BpfLogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl BpfLogLevel {
    /// The value of `AYA_LOG_LEVEL`: records of a level numerically at most this one
    /// are written (aya-log's `Level` counts Error = 1 up to Trace = 5; 0 is none).
    pub fn global_value(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for BpfLogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

/// Turns aya-log's `log` records into tracing events.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToTracing;

impl Log for ToTracing {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        // The level was chosen in the kernel already; the subscriber filters the rest.
        true
    }

    fn log(&self, record: &Record<'_>) {
        // tracing needs the level at compile time: one arm per level.
        let module = record.target();
        let message = record.args();
        match record.level() {
            Level::Error => tracing::error!(target: "bpf", module, "{message}"),
            Level::Warn => tracing::warn!(target: "bpf", module, "{message}"),
            Level::Info => tracing::info!(target: "bpf", module, "{message}"),
            Level::Debug => tracing::debug!(target: "bpf", module, "{message}"),
            Level::Trace => tracing::trace!(target: "bpf", module, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring buffer.
pub struct ProgramLog(EbpfLogger<ToTracing>);

impl ProgramLog {
    /// Takes the log ring buffer out of the loaded object.
    pub(crate) fn new(ebpf: &mut Ebpf) -> Result<Self> {
        EbpfLogger::init_with_logger(ebpf, ToTracing)
            .map(Self)
            .context("opening the programs' log buffer")
    }

    /// Turns every record waiting in the buffer into a tracing event.
    pub fn flush(&mut self) {
        self.0.flush();
    }

    /// Forwards records as they arrive, until the task is dropped.
    pub async fn forward(self) {
        // SAFETY: the fd is the ring buffer's map fd, owned by the logger that the
        // AsyncFd owns in turn: it stays open and the same for the AsyncFd's lifetime.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("program logs are lost: cannot poll their buffer: {e}");
                return;
            }
        };
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("program logs are lost: polling their buffer: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_aya_log() {
        assert_eq!(BpfLogLevel::Off.global_value(), 0);
        assert_eq!(
            BpfLogLevel::Error.global_value(),
            aya_log::Level::Error as u8
        );
        assert_eq!(
            BpfLogLevel::Debug.global_value(),
            aya_log::Level::Debug as u8
        );
        assert_eq!(
            BpfLogLevel::Trace.global_value(),
            aya_log::Level::Trace as u8
        );
        assert_eq!(BpfLogLevel::Warn.to_string(), "warn");
    }
}
