//! Program logs: every drop is logged at debug when the agent loads the programs with
//! that level, nothing is written below it, and the records reach tracing.

use std::sync::{Arc, Mutex};

use aya_log::EbpfLogger;
use overlay_agent::{bpf_log::BpfLogLevel, datapath::LoadOptions};
use overlay_common::Hook;

use super::{
    fixture::{Node, with_node_setup},
    traffic::exchange,
};

fn with_logging_node(level: BpfLogLevel, test: impl FnOnce(&mut Node) + Send + 'static) {
    let options = LoadOptions {
        log_level: level,
        ..LoadOptions::default()
    };
    with_node_setup(options, |_| {}, test);
}

const UNKNOWN_PEER_RECORD: &str =
    "uplink_ingress dropped drop_unknown_peer: 172.18.0.66 -> 172.18.0.3 proto 4";

/// Collects the records it is given, as "LEVEL message".
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

/// What the programs wrote to their log buffer for a forward each way and a drop (an
/// [`exchange`]), read independently of the agent's own reader (found through the
/// program, as the kernel reports it).
fn records_written(node: &mut Node) -> Vec<String> {
    // Only one consumer may read a ring buffer.
    drop(node.dp.take_log());
    let id = node
        .dp
        .program(Hook::UplinkIngress)
        .info()
        .expect("program info")
        .id();
    let collect = Collect::default();
    let mut reader = EbpfLogger::init_from_id_with_logger(id, collect.clone())
        .expect("the programs have a log buffer whatever the level");
    reader.flush();
    exchange(node);
    reader.flush();
    collect.0.lock().unwrap().clone()
}

#[test]
fn drops_are_logged_at_debug() {
    with_logging_node(BpfLogLevel::Debug, |node| {
        let records = records_written(node);
        assert_eq!(records, [format!("DEBUG {UNKNOWN_PEER_RECORD}")]);
    });
}

#[test]
fn nothing_is_written_below_debug() {
    for level in [BpfLogLevel::Off, BpfLogLevel::Info] {
        with_logging_node(level, move |node| {
            let records = records_written(node);
            assert_eq!(records, Vec::<String>::new(), "at level {level}");
        });
    }
}

#[test]
fn the_agent_has_no_log_reader_when_logging_is_off() {
    with_logging_node(BpfLogLevel::Off, |node| {
        assert!(node.dp.take_log().is_none());
    });
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn records_become_tracing_events() {
    with_logging_node(BpfLogLevel::Debug, |node| {
        let mut log = node.dp.take_log().expect("logging is on");
        exchange(node);
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log.flush());
        let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = output
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
            .collect();
        assert_eq!(events.len(), 1, "{output}");
        let event = &events[0];
        assert_eq!(event["level"], "DEBUG");
        assert_eq!(event["target"], "bpf");
        assert_eq!(event["fields"]["message"], UNKNOWN_PEER_RECORD);
        assert_eq!(event["fields"]["module"], "overlay_ebpf::counters");
    });
}

/// Translated size of each program as the kernel kept it after verification.
fn program_sizes(level: BpfLogLevel) -> Vec<u32> {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&sizes);
    with_logging_node(level, move |node| {
        for hook in Hook::ALL {
            let info = node.dp.program(hook).info().expect("program info");
            let size = info.size_translated().expect("the kernel reports the size");
            out.lock().unwrap().push(size);
        }
    });
    Arc::try_unwrap(sizes).unwrap().into_inner().unwrap()
}

#[test]
fn logging_code_is_removed_below_debug() {
    // The level is a frozen read-only global: the verifier knows its value and removes
    // the branches it can never take, so a datapath that does not log carries none of
    // the logging code.
    let off = program_sizes(BpfLogLevel::Off);
    assert_eq!(program_sizes(BpfLogLevel::Info), off);
    let debug = program_sizes(BpfLogLevel::Debug);
    for (i, hook) in Hook::ALL.iter().enumerate() {
        // `bridge_egress` only records what the host forwarded: it drops nothing, so it
        // has no drop to log.
        if *hook == Hook::BridgeEgress {
            assert_eq!(debug[i], off[i], "bridge_egress logs nothing");
            continue;
        }
        assert!(
            debug[i] > off[i],
            "{}: {} bytes logging at debug, {} off",
            hook.name(),
            debug[i],
            off[i]
        );
    }
}
