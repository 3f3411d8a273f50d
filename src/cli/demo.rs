use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tch::{Kind, Tensor};
use vit_msn::{Bundle, Device};
use vit_msn_graph::compile::parse_resolution;
use vit_msn_graph::untrained::write_untrained_checkpoint;
use vit_msn_graph::{CompileOptions, Wanted};

use super::CliResult;
use vit_msn::compiler::compile_bundle;

const LABELS: [&str; 5] = [
    "tabby cat",
    "golden retriever",
    "coffee mug",
    "mountain bike",
    "daisy",
];

/// Build, compile and run the embedded default: an UNTRAINED model of the
/// vit-msn-small shape with deterministic weights (no network, no files needed).
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn demo
  vit-msn demo --out /tmp/demo --rebuild")]
pub struct DemoArgs {
    /// Where the demo bundle goes (its model folder goes beside it).
    #[arg(long, default_value = "artifacts/demo")]
    out: PathBuf,
    /// Compile again even if the bundle exists.
    #[arg(long)]
    rebuild: bool,
}

pub fn demo(a: DemoArgs) -> CliResult {
    let model_dir = a.out.with_file_name(format!(
        "{}-model",
        a.out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "demo".into())
    ));
    println!("vit-msn demo: vit-msn-small architecture (384 wide, 12 layers, 6 heads, patch 16)");
    println!("  with deterministic UNTRAINED weights (seed 0); its predictions are meaningless.");
    if a.rebuild || !a.out.join("manifest.json").is_file() {
        let config = serde_json::json!({
            "model_type": "vit_msn",
            "architectures": ["ViTMSNForImageClassification"],
            "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
            "intermediate_size": 1536, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": true,
            "id2label": LABELS.iter().enumerate().map(|(i, l)| (i.to_string(), serde_json::json!(l))).collect::<serde_json::Map<_, _>>(),
        });
        write_untrained_checkpoint(&model_dir, &config, 0)?;
        let opts = CompileOptions {
            resolutions: vec![parse_resolution("224")?, parse_resolution("160")?],
            wanted: Wanted::default(),
            kind: Kind::Float,
            device: Device::Cpu,
            task: None,
        };
        let start = Instant::now();
        compile_bundle(&model_dir, &a.out, &opts)?;
        println!(
            "compiled {} (224x224, and 160x160 interpolated) in {:.1} s",
            a.out.display(),
            start.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "using the compiled bundle in {} (--rebuild to compile again)",
            a.out.display()
        );
    }
    let start = Instant::now();
    let bundle = Bundle::load(&a.out, Device::Cpu)?;
    println!(
        "loaded and warmed up in {:.2} s",
        start.elapsed().as_secs_f64()
    );

    tch::manual_seed(1);
    let labels = &bundle.manifest().model.labels;
    for (h, w) in [(224, 224), (160, 160)] {
        let batch = 4;
        let pixel_values = Tensor::randn([batch, 3, h, w], (Kind::Float, tch::Device::Cpu));
        let start = Instant::now();
        let out = bundle.forward(&pixel_values, None, None)?;
        let per_image = start.elapsed().as_secs_f64() * 1000.0 / batch as f64;
        let logits = out.logits.ok_or("the demo bundle returned no logits")?;
        let probs = logits.softmax(-1, Kind::Float);
        println!("{h}x{w}: batch of {batch} random images, {per_image:.1} ms per image");
        for i in 0..batch {
            let (p, idx) = probs.get(i).max_dim(0, false);
            let idx = idx.int64_value(&[]) as usize;
            println!(
                "  image {i}: {} ({:.3})",
                labels.get(idx).map(String::as_str).unwrap_or("?"),
                p.double_value(&[])
            );
        }
    }
    Ok(())
}
