//! The runtime's forward pass at batch 1 and 8 on a small untrained model
//! (ViT-Tiny shape: 192 wide, 12 layers, 3 heads, patch 16, 224). `make bench`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{Device, Kind, Tensor};
use vit_msn_graph::untrained::write_untrained_checkpoint;
use vit_msn_graph::{CompileOptions, Wanted};

fn bundle_dir() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-bundle");
    let model = root.join("model");
    let bundle = root.join("bundle");
    let _ = std::fs::remove_dir_all(&root);
    let config = serde_json::json!({
        "architectures": ["ViTMSNModel"], "hidden_size": 192, "num_hidden_layers": 12,
        "num_attention_heads": 3, "intermediate_size": 768, "image_size": 224, "patch_size": 16,
    });
    write_untrained_checkpoint(&model, &config, 0).expect("write checkpoint");
    let opts = CompileOptions {
        resolutions: vec![],
        wanted: Wanted::default(),
        kind: Kind::Float,
        device: Device::Cpu,
        task: None,
    };
    vit_msn::compiler::compile_bundle(&model, &bundle, &opts).expect("compile");
    bundle
}

fn forward(c: &mut Criterion) {
    let bundle = vit_msn::Bundle::load(bundle_dir(), Device::Cpu).expect("load");
    let mut group = c.benchmark_group("forward_vit_tiny_224");
    group.sample_size(10);
    for batch in [1i64, 8] {
        let px = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
        group.bench_function(format!("batch{batch}"), |b| {
            b.iter(|| bundle.forward(&px, None, None).expect("forward"))
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
