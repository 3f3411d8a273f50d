//! Any bytes as an image file, through decoding and preprocessing.

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    let path = std::path::Path::new("fuzz-image");
    let channels = if data.first().is_some_and(|b| b & 1 == 1) {
        1
    } else {
        3
    };
    if let Ok(img) = vit_msn::image::decode_bytes(data, path, channels) {
        let mut pp = vit_msn::image::Preprocessing::vit_msn_default();
        (pp.height, pp.width) = (32, 32);
        if channels == 1 {
            pp.image_mean = vec![0.5];
            pp.image_std = vec![0.5];
        }
        let _ = vit_msn::image::preprocess_image(&img, &pp);
    }
}
