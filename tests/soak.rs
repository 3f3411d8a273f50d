//! Soak: 2,000 forward passes in one process with RSS sampled; after warm-up
//! it must not grow by more than 5%. Ignored in the default run: `make soak`.

mod common;

use tch::{Device, Kind, Tensor};
use vit_msn::Bundle;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096.0 / (1024.0 * 1024.0)
}

#[test]
#[ignore = "long: run with `make soak`"]
fn two_thousand_passes_without_growth() {
    let bundle = Bundle::load(
        common::compile_case(
            "base",
            "soak",
            &[
                "--resolutions",
                "48x40",
                "--outputs",
                "hidden_states,attentions",
            ],
        ),
        Device::Cpu,
    )
    .expect("load");
    tch::manual_seed(5);
    let mut samples = Vec::new();
    for i in 0..2000 {
        // Varying batch sizes and inputs, masks and head masks, as a server sees them.
        let batch = 1 + (i % 4) as i64;
        let px = Tensor::randn([batch, 3, 48, 40], (Kind::Float, Device::Cpu));
        let mask = Tensor::rand([batch, 30], (Kind::Float, Device::Cpu)).lt(0.3);
        let hm = Tensor::rand([2, 4], (Kind::Float, Device::Cpu));
        let out = bundle
            .forward(&px, Some(&mask), Some(&hm))
            .expect("forward");
        assert_eq!(out.last_hidden_state.expect("output").size()[0], batch);
        if i % 100 == 99 {
            samples.push(rss_mib());
        }
    }
    let after_warmup = samples[2];
    let last = *samples.last().expect("samples");
    eprintln!("RSS MiB every 100 passes: {samples:.1?}");
    assert!(
        last <= after_warmup * 1.05,
        "RSS grew from {after_warmup:.1} to {last:.1} MiB"
    );
}
