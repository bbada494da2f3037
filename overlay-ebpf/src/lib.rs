#![no_std]
// The programs live in the binary target (main.rs); this empty library only lets
// overlay-agent name the crate as a build dependency so cargo rebuilds it on change.
