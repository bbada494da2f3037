//! Packet tests of the datapath: frames built as bytes run through the TC programs with
//! `BPF_PROG_TEST_RUN`, and every byte, checksum, return code and counter checked
//! against references built independently with etherparse. Needs root.

mod datapath {
    // Support.
    mod expect;
    mod fixture;
    mod packet;
    mod topology;
    mod traffic;

    // Tests, one concern each.
    mod admission;
    mod blackhole;
    mod bpf_log;
    mod chain;
    mod conntrack;
    mod cost;
    mod decap;
    mod direct;
    mod egress;
    mod encap;
    mod fast_path;
    mod forward_rules;
    mod host_events;
    mod http;
    mod icmp;
    mod inspect;
    mod load;
    mod malformed;
    mod mtu;
    mod nat;
    mod nat_bridge;
    mod nat_icmp;
    mod passthrough;
    mod pod_ingress;
    mod pod_ports;
    mod slow_path;
}
