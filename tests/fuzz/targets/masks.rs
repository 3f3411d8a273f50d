//! The command line's head-mask spec and mask ratio.

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (layers, heads) = (1 + (data[0] % 24) as i64, 1 + (data[1] % 16) as i64);
    if let Ok(spec) = std::str::from_utf8(&data[2..]) {
        if let Ok(t) = vit_msn::inputs::parse_head_mask(spec, layers, heads) {
            assert_eq!(t.size(), [layers, heads]);
        }
        let _ = vit_msn::manifest::parse_resolution(spec);
        if let Ok(ratio) = spec.trim().parse::<f64>() {
            let _ = vit_msn::inputs::random_mask(2, heads * 4, ratio, layers as u64);
        }
    }
}
