//! The runtime's forward pass at batch 1 and 8 on untrained backbones of the
//! ViT-Tiny (192 wide, 3 heads) and vit-msn-small (384 wide, 6 heads) shapes,
//! 12 layers, patch 16, 224. `make bench`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{Device, Kind, Tensor};
use vit_msn_graph::untrained::write_untrained_checkpoint;
use vit_msn_graph::{CompileOptions, Config, Wanted};

/// Compiles an untrained backbone of the given shape at 224 into target/.
fn bundle_dir(name: &str, hidden: i64, heads: i64) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-bundle")
        .join(name);
    let model = root.join("model");
    let bundle = root.join("bundle");
    let _ = std::fs::remove_dir_all(&root);
    let config = Config::preset(hidden, 12, heads, 16).raw;
    write_untrained_checkpoint(&model, &config, 0).expect("write checkpoint");
    let opts = CompileOptions {
        resolutions: vec![],
        wanted: Wanted::default(),
        kind: Kind::Float,
        device: Device::Cpu,
        task: None,
        linear: None,
        attention: None,
        cpu_features: Vec::new(),
    };
    vit_msn::compiler::compile_bundle(&model, &bundle, &opts).expect("compile");
    bundle
}

fn forward(c: &mut Criterion) {
    for (name, hidden, heads) in [("vit_tiny_224", 192, 3), ("vit_msn_small_224", 384, 6)] {
        let bundle =
            vit_msn::Bundle::load(bundle_dir(name, hidden, heads), Device::Cpu).expect("load");
        let mut group = c.benchmark_group(format!("forward_{name}"));
        group.sample_size(10);
        for batch in [1i64, 8] {
            let px = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
            group.bench_function(format!("batch{batch}"), |b| {
                b.iter(|| bundle.forward(&px, None, None).expect("forward"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
