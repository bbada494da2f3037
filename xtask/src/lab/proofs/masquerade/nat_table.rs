//! A node's masquerade connection table, read through `overlay-agent nat` as an
//! operator would: what the checks hold the datapath to.

use std::{collections::BTreeMap, net::SocketAddrV4};

use anyhow::{Context as _, Result, bail};

use crate::lab::machinery::{agents, probe::Proto, state::LabState, topology::Node};

/// One flow as `overlay-agent nat` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Flow {
    pub proto: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Where the source was translated to; None for tracked, untranslated flows.
    pub translated: Option<SocketAddrV4>,
    /// The `--ip-masq` rule that decided the flow.
    pub rule: Option<u8>,
}

impl Flow {
    pub(super) fn is(&self, proto: Proto) -> bool {
        self.proto == proto.name().to_ascii_lowercase()
    }

    /// "tcp 172.18.0.3:40001 → 10.244.2.2:35000 as 10.244.1.1:61234 (rule 6)"
    pub(super) fn describe(&self) -> String {
        let translated = self
            .translated
            .map_or("untranslated".to_owned(), |t| format!("as {t}"));
        let rule = self.rule.map_or("?".to_owned(), |r| r.to_string());
        format!(
            "{} {} → {} {translated} (rule {rule})",
            self.proto, self.src, self.dst
        )
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct NatTable {
    pub flows: Vec<Flow>,
    /// `flow_created`, `port_collision`, ... and their counts.
    pub events: BTreeMap<String, u64>,
}

impl NatTable {
    pub(super) fn read(lab: &LabState, node: &Node) -> Result<Self> {
        let text = agents::inspect(lab, node, "nat")?;
        Self::parse(&text).with_context(|| format!("reading the NAT table of {}", node.name))
    }

    pub(super) fn parse(text: &str) -> Result<Self> {
        let mut table = Self::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [proto, src, dst, translated, rule, ..] if src.parse::<SocketAddrV4>().is_ok() => {
                    table.flows.push(Flow {
                        proto: (*proto).to_owned(),
                        src: src.parse()?,
                        dst: dst.parse().with_context(|| format!("in {line:?}"))?,
                        translated: match *translated {
                            "-" => None,
                            t => Some(t.parse().with_context(|| format!("in {line:?}"))?),
                        },
                        rule: rule.parse().ok(),
                    });
                }
                [name, count] => {
                    if let Ok(count) = count.parse() {
                        table.events.insert((*name).to_owned(), count);
                    }
                }
                _ => {}
            }
        }
        if !table.events.contains_key("flow_created") {
            bail!("no event counts in:\n{text}");
        }
        Ok(table)
    }

    pub(super) fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }

    /// The flow whose original source and destination these are.
    pub(super) fn find(&self, proto: Proto, src: SocketAddrV4, dst: SocketAddrV4) -> Option<&Flow> {
        self.flows
            .iter()
            .find(|f| f.is(proto) && f.src == src && f.dst == dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_agent_prints() {
        let text = "PROTO SOURCE                 DESTINATION            TRANSLATED TO          RULE  STATE             AGE  EXPIRES\n\
icmp  10.244.1.2:4462        198.51.100.10:0        172.18.0.3:62377       5     established        4s      25s\n\
udp   172.18.0.3:55802       10.244.2.2:9000        10.244.1.1:65136       6     established        0s     179s\n\
tcp   198.51.100.10:41000    10.244.1.2:80          -                      0     closing            1s       9s\n\
3 flows\n\
flow_created                        4\n\
port_collision                      2\n\
icmp_error_translated               0\n";
        let table = NatTable::parse(text).unwrap();
        assert_eq!(table.flows.len(), 3);
        assert_eq!(table.event("port_collision"), 2);
        assert_eq!(table.event("flow_created"), 4);
        let rule6 = table
            .find(
                Proto::Udp,
                "172.18.0.3:55802".parse().unwrap(),
                "10.244.2.2:9000".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(rule6.translated, Some("10.244.1.1:65136".parse().unwrap()));
        assert_eq!(rule6.rule, Some(6));
        assert_eq!(
            rule6.describe(),
            "udp 172.18.0.3:55802 → 10.244.2.2:9000 as 10.244.1.1:65136 (rule 6)"
        );
        let untranslated = &table.flows[2];
        assert!(untranslated.is(Proto::Tcp));
        assert_eq!(
            (untranslated.translated, untranslated.rule),
            (None, Some(0))
        );
        assert!(NatTable::parse("no table here").is_err());
    }
}
