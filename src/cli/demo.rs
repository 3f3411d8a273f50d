use std::path::{Path, PathBuf};
use std::time::Instant;

use super::attention_map::{HeadChoice, LayerChoice};
use clap::Args;
use tch::{Kind, Tensor};
use vit_msn::compiler::compile_bundle;
use vit_msn::files::write_result_file;
use vit_msn::image::{preprocess_path, Preprocessing};
use vit_msn::manifest::parse_resolution;
use vit_msn::{Bundle, Device, Error};
use vit_msn_graph::untrained::write_untrained_checkpoint;
use vit_msn_graph::Config;
use vit_msn_graph::{CompileOptions, Wanted};

use super::attention::write_attention_map;
use super::CliResult;

const LABELS: [&str; 6] = [
    "tabby cat",
    "coffee mug",
    "astronaut",
    "rocket",
    "camera",
    "golden retriever",
];

/// Small real photos (scikit-image's public-domain / CC0 samples, see
/// src/cli/demo_photos/README.md), built into the binary so the demo needs no files.
const PHOTOS: [(&str, &[u8]); 5] = [
    ("chelsea.jpg", include_bytes!("demo_photos/chelsea.jpg")),
    ("coffee.jpg", include_bytes!("demo_photos/coffee.jpg")),
    ("astronaut.jpg", include_bytes!("demo_photos/astronaut.jpg")),
    ("rocket.jpg", include_bytes!("demo_photos/rocket.jpg")),
    ("camera.png", include_bytes!("demo_photos/camera.png")),
];

/// Build, compile and run the embedded default: an UNTRAINED classifier of the
/// vit-msn-small shape with deterministic weights, on five built-in photos. No
/// network and no files needed.
#[derive(Args)]
#[command(after_help = "Examples:
  vit-msn demo
  vit-msn demo --out /tmp/demo --rebuild")]
pub struct DemoArgs {
    /// Where the demo bundle goes (its model folder and photos go beside it).
    #[arg(long, default_value = "artifacts/demo")]
    out: PathBuf,
    /// Compile again even if the bundle exists.
    #[arg(long)]
    rebuild: bool,
}

fn beside(out: &Path, suffix: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "demo".into());
    out.with_file_name(format!("{name}-{suffix}"))
}

pub fn demo(a: DemoArgs) -> CliResult {
    let model_dir = beside(&a.out, "model");
    let photo_dir = beside(&a.out, "photos");
    println!("vit-msn demo: a classifier of the vit-msn-small shape (384 wide, 12 layers, 6 heads, patch 16)");
    println!("with deterministic UNTRAINED weights (seed 0): no pretrained weights can be downloaded here,");
    println!(
        "so its labels are placeholders and its predictions are meaningless. The pipeline is real."
    );
    if a.rebuild || !a.out.join("manifest.json").is_file() {
        let mut config = Config::vit_msn_small().raw;
        config["architectures"] = serde_json::json!(["ViTMSNForImageClassification"]);
        config["id2label"] = LABELS
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        write_untrained_checkpoint(&model_dir, &config, 0)?;
        // The facebook/vit-msn-* processor settings, so that transformers'
        // ViTImageProcessor.from_pretrained reads the same folder the same way.
        let processor = Preprocessing::vit_msn_default().to_json().to_string();
        write_result_file(
            &model_dir.join("preprocessor_config.json"),
            processor.as_bytes(),
        )?;
        let opts = CompileOptions {
            resolutions: vec![parse_resolution("224")?, parse_resolution("160")?],
            wanted: Wanted {
                hidden_states: false,
                attentions: true,
            },
            kind: Kind::Float,
            device: Device::Cpu,
            task: None,
            linear: None,
            attention: None,
            cpu_features: Vec::new(),
        };
        let start = Instant::now();
        compile_bundle(&model_dir, &a.out, &opts)?;
        println!(
            "compiled {} at 224x224 and 160x160 (interpolated) in {:.1} s",
            a.out.display(),
            start.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "using the bundle in {} (--rebuild compiles it again)",
            a.out.display()
        );
    }
    std::fs::create_dir_all(&photo_dir).map_err(|e| Error::io(&photo_dir, e))?;
    let mut photos = Vec::new();
    for (name, bytes) in PHOTOS {
        let path = photo_dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            write_result_file(&path, bytes)?;
        }
        photos.push(path);
    }

    let start = Instant::now();
    let bundle = Bundle::load(&a.out, Device::Cpu)?;
    println!(
        "loaded and warmed up in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let m = bundle.manifest();
    println!("CLS embedding size: {}", m.model.hidden_size);
    let mut pp = m.preprocessing()?;
    for size in [224u32, 160] {
        (pp.height, pp.width) = (size, size);
        let start = Instant::now();
        let px = photos
            .iter()
            .map(|p| preprocess_path(p, &pp, 3))
            .collect::<Result<Vec<_>, _>>()?;
        let px = Tensor::stack(&px, 0);
        let prep_ms = start.elapsed().as_secs_f64() * 1000.0 / photos.len() as f64;
        let start = Instant::now();
        let out = bundle.forward(&px, None, None)?;
        let run_ms = start.elapsed().as_secs_f64() * 1000.0 / photos.len() as f64;
        println!("{size}x{size}: preprocessing {prep_ms:.1} ms and forward {run_ms:.1} ms per image (batch of {})", photos.len());
        let probs = out
            .logits
            .ok_or("the demo bundle returned no logits")?
            .softmax(-1, Kind::Float);
        for (i, p) in photos.iter().enumerate() {
            let (top, idx) = probs.get(i as i64).topk(2, -1, true, true);
            let label = |j: i64| {
                m.model
                    .labels
                    .get(idx.int64_value(&[j]) as usize)
                    .cloned()
                    .unwrap_or_default()
            };
            println!(
                "  {:<14} {} {:.3}, {} {:.3}",
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                label(0),
                top.double_value(&[0]),
                label(1),
                top.double_value(&[1])
            );
        }
    }
    let map = beside(&a.out, "attention.png");
    write_attention_map(
        &bundle,
        &photos[0],
        &map,
        LayerChoice::Rollout,
        HeadChoice::Mean,
    )?;
    println!(
        "attention map (rollout, mean of heads) of {}: {}",
        photos[0].display(),
        map.display()
    );
    Ok(())
}
