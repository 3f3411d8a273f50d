//! An application that links only the runtime: load a bundle, classify an image.
//!   cargo run --release --example embed -- artifacts/demo src/cli/demo_photos/chelsea.jpg
use vit_msn::{image::preprocess_path, Bundle, Device};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, image] = args.as_slice() else {
        return Err("usage: embed BUNDLE_DIR IMAGE".into());
    };
    let bundle = Bundle::load(dir, Device::Cpu)?; // verifies digests, warms up
    let m = bundle.manifest();
    let pixel_values = preprocess_path(image.as_ref(), &m.preprocessing()?, m.model.num_channels)?;
    let out = bundle.forward(&pixel_values.unsqueeze(0), None, None)?;
    match out.logits {
        Some(logits) => {
            let probs = logits.softmax(-1, tch::Kind::Float);
            let best = probs.argmax(-1, false).int64_value(&[0]);
            let label = m
                .model
                .labels
                .get(best as usize)
                .map_or("?", String::as_str);
            println!("{image}: {label} ({:.3})", probs.double_value(&[0, best]));
        }
        None => println!("{image}: CLS embedding of size {}", m.model.hidden_size),
    }
    Ok(())
}
