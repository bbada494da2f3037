//! The verifier accepts all three programs.

use overlay_agent::datapath::Datapath;
use overlay_common::Hook;

#[test]
fn verifier_accepts_all_programs() {
    // No namespace needed: loading touches no device.
    let dp = Datapath::load(&Default::default()).expect("the verifier must accept every program");
    for hook in Hook::ALL {
        let info = dp.program(hook).info().expect("program info");
        assert_eq!(
            info.name_as_str(),
            Some(hook.program()),
            "loaded program for {hook:?}"
        );
    }
}
