//! Any bytes as config.json: a typed error or a validated config.

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(cfg) = vit_msn_graph::Config::from_value(value) {
            // What the graph derives from a valid config must not panic either.
            let _ = (cfg.head_dim(), cfg.num_labels(), cfg.activation());
        }
    }
}
