//! Model folders the compiler must refuse with a clear, one-line error that
//! names the file, field or tensor, and exit code 1; never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{case_dir, read, scratch, vit_msn};
use serde_json::Value;
use tch::Tensor;

fn copy_model(case: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(case_dir(case).join("model")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = model.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

/// Runs `compile` on a broken copy of a fixture; returns stderr.
fn compile_fails(name: &str, case: &str, break_it: impl FnOnce(&Path)) -> String {
    let dir = scratch(&format!("compile-error-{name}"));
    let model: PathBuf = dir.join("model");
    copy_model(case, &model);
    break_it(&model);
    let out_dir = dir.join("bundle");
    let out = vit_msn(&[&"compile", &"--model", &model, &"--out", &out_dir]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1,
        "{name}: {stderr}"
    );
    assert!(!out_dir.exists(), "{name}: a bundle was written");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "{name}: temporary files left behind: {leftovers:?}"
    );
    stderr
}

fn rewrite_weights(model: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = model.join("model.safetensors");
    let mut tensors = read(&path);
    edit(&mut tensors);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &path).unwrap();
}

#[test]
fn config_errors() {
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "missing",
            Box::new(|m: &Path| std::fs::remove_file(m.join("config.json")).unwrap()),
            "config.json: No such file",
        ),
        (
            "not_json",
            Box::new(|m: &Path| std::fs::write(m.join("config.json"), "{nope").unwrap()),
            "not valid JSON",
        ),
        (
            "act",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("hidden_act".into(), "swiglu".into());
                })
            }),
            "unknown `hidden_act` `swiglu`",
        ),
        (
            "negative_layers",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("num_hidden_layers".into(), (-1).into());
                })
            }),
            "`num_hidden_layers` must not be negative, found -1",
        ),
        (
            "negative",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("hidden_size".into(), (-32).into());
                })
            }),
            "`hidden_size` must be positive",
        ),
        (
            "heads",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("num_attention_heads".into(), 5.into());
                })
            }),
            "not divisible by `num_attention_heads` 5",
        ),
        (
            "grid",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("image_size".into(), 4.into());
                })
            }),
            "`image_size` 4 is smaller than `patch_size` 8: the trained position grid is empty",
        ),
        (
            "type",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("patch_size".into(), "8".into());
                })
            }),
            "`patch_size` must be an integer",
        ),
        (
            "non_square",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("image_size".into(), serde_json::json!([32, 48]));
                })
            }),
            "`image_size` [32, 48] is not square; only square sizes are supported",
        ),
        (
            "three_sides",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("patch_size".into(), serde_json::json!([8, 8, 8]));
                })
            }),
            "`patch_size` must be an integer or a list of two integers",
        ),
    ];
    for (name, break_it, expect) in cases {
        let err = compile_fails(&format!("config-{name}"), "no_qkv_bias", break_it);
        assert!(err.contains(expect), "{name}: {err}");
        assert!(
            err.contains("config.json"),
            "{name}: the message does not name the file: {err}"
        );
    }
}

#[test]
fn weight_errors() {
    let err = compile_fails("no-weights", "no_qkv_bias", |m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap()
    });
    assert!(err.contains("no weights file"), "{err}");

    let err = compile_fails("missing-tensor", "no_qkv_bias", |m| {
        rewrite_weights(m, |t| {
            t.retain(|(n, _)| n != "encoder.layer.1.output.dense.weight")
        })
    });
    assert!(
        err.contains("`encoder.layer.1.output.dense.weight` is missing (expected shape [32, 64])"),
        "{err}"
    );

    let err = compile_fails("wrong-shape", "no_qkv_bias", |m| {
        rewrite_weights(m, |t| {
            let i = t.iter().position(|(n, _)| n == "layernorm.weight").unwrap();
            t[i].1 = Tensor::ones([31], (tch::Kind::Float, tch::Device::Cpu));
        })
    });
    assert!(
        err.contains("`layernorm.weight` has shape [31], expected [32]"),
        "{err}"
    );

    let err = compile_fails("truncated", "no_qkv_bias", |m| {
        let p = m.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(
        err.contains("model.safetensors: invalid safetensors"),
        "{err}"
    );

    let err = compile_fails("header-past-end", "no_qkv_bias", |m| {
        let p = m.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, bytes).unwrap();
    });
    assert!(err.contains("invalid safetensors"), "{err}");

    let err = compile_fails("overlapping-offsets", "no_qkv_bias", |m| {
        let header = br#"{"layernorm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"layernorm.bias":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 12]);
        std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    });
    assert!(
        err.contains("model.safetensors: invalid safetensors"),
        "{err}"
    );

    let err = compile_fails("int-dtype", "no_qkv_bias", |m| {
        rewrite_weights(m, |t| {
            let i = t.iter().position(|(n, _)| n == "layernorm.bias").unwrap();
            t[i].1 = t[i].1.to_kind(tch::Kind::Int);
        })
    });
    assert!(err.contains("`layernorm.bias` has dtype I32"), "{err}");

    let err = compile_fails("bad-bin", "classifier_bin", |m| {
        std::fs::write(
            m.join("pytorch_model.bin"),
            b"PK\x03\x04 this is not a zip archive",
        )
        .unwrap()
    });
    assert!(
        err.contains("pytorch_model.bin: not a readable PyTorch state dict"),
        "{err}"
    );

    // A zip whose central directory gives every tensor data record 0 bytes
    // (found by the pytorch_bin fuzz target), or 4: libtorch sizes each
    // storage by the pickle's claim, not by its record, and the compiler
    // used to read past the data (a segfault copying the first weight).
    for record_size in [0u32, 4] {
        let err = compile_fails(
            &format!("bin-records-{record_size}"),
            "classifier_bin",
            |m| {
                let p = m.join("pytorch_model.bin");
                let mut bytes = std::fs::read(&p).unwrap();
                let changed = common::resize_zip_records(&mut bytes, "/data/", record_size);
                assert!(changed > 0, "no data records found");
                std::fs::write(&p, bytes).unwrap();
            },
        );
        assert!(
            err.contains("pytorch_model.bin: not a readable PyTorch state dict: tensor `")
                && err.contains(&format!(
                    "does not fit the {record_size} bytes the file holds for it"
                )),
            "{err}"
        );
    }

    // Two more found by fuzzing, each a few bytes changed in place:
    // - a pickle memo index of 2^31 - 1 (LONG_BINPUT where data.pkl starts
    //   `PROTO 2, EMPTY_DICT, BINPUT 0, MARK`): libtorch's unpickler grew its
    //   memo table to it, over 20 GB resident from a 2 KB file;
    // - a tensor name that is not UTF-8: an abort in tch's loader callback.
    // (scratch name, bytes to find, offset into them, replacement, error)
    type Patch<'a> = (&'a str, &'a [u8], usize, &'a [u8], &'a str);
    let patches: [Patch; 2] = [
        (
            "bin-memo-bomb",
            b"\x80\x02}q\x00(",
            3,
            b"r\xff\xff\xff\x7f",
            "data.pkl: memo index 2147483647",
        ),
        (
            "bin-name-not-utf8",
            b"layernorm.weight",
            9,
            b"\xff",
            "a tensor name is not UTF-8",
        ),
    ];
    for (name, needle, offset, replacement, expected) in patches {
        let err = compile_fails(name, "classifier_bin", |m| {
            common::patch_file(&m.join("pytorch_model.bin"), needle, offset, replacement);
        });
        assert!(
            err.contains(&format!(
                "pytorch_model.bin: not a readable PyTorch state dict: {expected}"
            )),
            "{name}: {err}"
        );
    }

    let err = compile_fails("missing-shard", "classifier_sharded", |m| {
        let shard = std::fs::read_dir(m)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.to_string_lossy().ends_with("-of-00002.safetensors")
                    || p.to_string_lossy().contains("-of-")
            })
            .unwrap();
        std::fs::remove_file(shard).unwrap();
    });
    assert!(
        err.contains("model.safetensors.index.json: names shard") && err.contains("not a file"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = vit_msn(&[&"compile", &"--model"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vit_msn(&[
        &"compile",
        &"--model",
        &case_dir("base").join("model"),
        &"--out",
        &scratch("usage").join("b"),
        &"--resolutions",
        &"32,abc",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`abc` is not N or HxW"));
    // Values clap takes as strings are checked by the command: still usage errors.
    let model = case_dir("base").join("model");
    for (flag, value, expect) in [
        ("--outputs", "logits", "unknown output `logits`"),
        ("--linear", "mkl", "unknown backend `mkl`"),
        ("--attention", "flash", "unknown implementation `flash`"),
        ("--dtype", "f64", "f64"),
        ("--device", "gpu", "unknown device `gpu`"),
        ("--task", "segmentation", "segmentation"),
        ("--threads", "0", "--threads must be at least 1"),
    ] {
        let out = vit_msn(&[
            &"compile",
            &"--model",
            &model,
            &"--out",
            &scratch("usage").join("c"),
            &flag,
            &value,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(expect), "{flag} {value}: {stderr}");
    }
    let out = vit_msn(&[
        &"compile",
        &"--model",
        &model,
        &"--out",
        &scratch("usage").join("d"),
        &"--outputs",
        &"attentions",
        &"--attention",
        &"explicit",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("computes eager attention"), "{stderr}");
}

/// Outputs never replace what is not ours: a folder holding other files, the
/// model folder itself, a bundle that holds the model, a non-empty `init`
/// target, or a FIFO where an output file goes. Each is refused, untouched.
#[test]
fn outputs_that_would_lose_data_are_refused() {
    let dir = scratch("compile-error-outputs");
    let model = dir.join("model");
    copy_model("base", &model);
    let refused = |args: &[&dyn AsRef<std::ffi::OsStr>], expected: &str| {
        let out = vit_msn(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(expected) && stderr.trim_end().lines().count() == 1,
            "expected `{expected}`: {stderr}"
        );
    };

    // A folder with someone's file in it.
    let notes = dir.join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), "keep me").unwrap();
    refused(
        &[&"compile", &"--model", &model, &"--out", &notes],
        "is not a bundle (no vit-msn manifest.json); refusing to replace it",
    );
    assert_eq!(
        std::fs::read_to_string(notes.join("notes.txt")).unwrap(),
        "keep me"
    );
    // Someone else's manifest.json does not make a bundle.
    std::fs::write(notes.join("manifest.json"), r#"{"name": "my web app"}"#).unwrap();
    refused(
        &[&"compile", &"--model", &model, &"--out", &notes],
        "is not a bundle (no vit-msn manifest.json); refusing to replace it",
    );
    assert!(notes.join("notes.txt").is_file());

    // The model folder itself.
    refused(
        &[&"compile", &"--model", &model, &"--out", &model],
        "an input of this command; refusing to replace it",
    );
    assert!(model.join("config.json").is_file() && model.join("model.safetensors").is_file());

    // A bundle may be replaced, but not when the model lies inside it.
    let bundle = dir.join("bundle");
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &bundle]),
        "compile",
    );
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &bundle]),
        "compile over an older bundle",
    );
    // A bundle with someone's file in it is not replaced either.
    std::fs::write(bundle.join("notes.txt"), "keep me").unwrap();
    refused(
        &[&"compile", &"--model", &model, &"--out", &bundle],
        "is a bundle but also holds notes.txt that are not part of it",
    );
    std::fs::remove_file(bundle.join("notes.txt")).unwrap();
    let inner = bundle.join("model");
    copy_model("base", &inner);
    refused(
        &[&"compile", &"--model", &inner, &"--out", &bundle],
        "an input of this command; refusing to replace it",
    );
    assert!(inner.join("model.safetensors").is_file());

    // init writes only into an absent or empty folder.
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    refused(
        &[
            &"init",
            &"--config",
            &model.join("config.json"),
            &"--out",
            &model,
        ],
        "refusing to replace it",
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    common::assert_ok(
        &vit_msn(&[
            &"init",
            &"--config",
            &model.join("config.json"),
            &"--out",
            &empty,
        ]),
        "init into an empty folder",
    );

    // A FIFO (or device) where an output file goes is refused, not renamed over.
    let fifo = dir.join("out.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let inputs = case_dir("base").join("plain_32x32.in.safetensors");
    refused(
        &[
            &"run",
            &"--bundle",
            &bundle,
            &"--inputs",
            &inputs,
            &"--output",
            &fifo,
        ],
        "exists and is not a regular file; refusing to replace it",
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());

    // An output file that is one of the command's inputs.
    let photo = dir.join("photo.jpg");
    std::fs::copy(
        common::root().join("src/cli/demo_photos/coffee.jpg"),
        &photo,
    )
    .unwrap();
    let before = std::fs::read(&photo).unwrap();
    refused(
        &[
            &"preprocess",
            &"--image",
            &photo,
            &"--bundle",
            &bundle,
            &"--output",
            &photo,
        ],
        "is an input of this command (",
    );
    let copied_inputs = dir.join("in.safetensors");
    std::fs::copy(&inputs, &copied_inputs).unwrap();
    refused(
        &[
            &"run",
            &"--bundle",
            &bundle,
            &"--inputs",
            &copied_inputs,
            &"--output",
            &copied_inputs,
        ],
        "is an input of this command (",
    );
    assert_eq!(std::fs::read(&photo).unwrap(), before);

    // Into an image folder: an image there would be read as an input, but
    // any other output (an earlier run's) is fine to overwrite.
    let photos = dir.join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::copy(&photo, photos.join("a.jpg")).unwrap();
    let npy = photos.join("emb.npy");
    for _ in 0..2 {
        common::assert_ok(
            &vit_msn(&[
                &"run",
                &"--bundle",
                &bundle,
                &"--image",
                &photos,
                &"--embeddings",
                &npy,
            ]),
            "run --embeddings into the image folder, twice",
        );
    }
    std::fs::write(photos.join("b.png"), b"not yet an image").unwrap();
    refused(
        &[
            &"attention",
            &"--bundle",
            &bundle,
            &"--image",
            &photos.join("b.png"),
            &"--out",
            &photos.join("b.png"),
        ],
        "is an input of this command (",
    );
}

/// Sizes far beyond the weights, or beyond any ViT, are refused by the config
/// check before anything is allocated: an error, never an allocation abort.
#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let set = |key: &'static str, value: Value| {
        move |m: &Path| {
            edit_config(m, |c| {
                c.insert(key.into(), value.clone());
            })
        }
    };
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "hidden",
            Box::new(set("hidden_size", (1i64 << 20).into())),
            "`hidden_size` must be at most 65536",
        ),
        (
            "layers",
            Box::new(set("num_hidden_layers", 1_000_000_000_000i64.into())),
            "`num_hidden_layers` must be at most 4096",
        ),
        (
            "intermediate",
            Box::new(set("intermediate_size", 1_000_000_000_000_000i64.into())),
            "more than 4294967296 parameters",
        ),
        (
            "image",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("image_size".into(), 8_000_000.into());
                    c.insert("patch_size".into(), 1.into());
                })
            }),
            "`image_size` must be at most 16384",
        ),
        (
            "labels",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.remove("id2label");
                    c.remove("label2id");
                    c.insert("num_labels".into(), 10_000_000_000_000i64.into());
                })
            }),
            "`num_labels` must be in 1..=16777216",
        ),
        (
            "no_labels",
            Box::new(|m: &Path| {
                edit_config(m, |c| {
                    c.insert("id2label".into(), serde_json::json!({}));
                    c.insert("label2id".into(), serde_json::json!({}));
                })
            }),
            "`id2label` is empty: a classifier without labels",
        ),
        (
            // Within the cap, but 100 times the weights the checkpoint holds.
            "beyond_weights",
            Box::new(set("intermediate_size", 64_000.into())),
            "its sizes do not match the weights",
        ),
    ];
    for (name, break_it, expect) in cases {
        let err = compile_fails(&format!("absurd-{name}"), "classifier_regression", break_it);
        assert!(err.contains(expect), "{name}: {err}");
    }

    // init has no weights to compare with: the cap alone.
    let dir = scratch("absurd-init");
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"hidden_size": 65536, "num_attention_heads": 1, "num_hidden_layers": 4096}"#,
    )
    .unwrap();
    let out = vit_msn(&[&"init", &"--config", &config, &"--out", &dir.join("m")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than 4294967296 parameters"),
        "{stderr}"
    );

    // Resolutions and threads have upper bounds too. Past the flag's own
    // bound it is a usage error (2); too many patches for this model's patch
    // size is the model's limit (1).
    let model = case_dir("base").join("model");
    for (args, code, expect) in [
        (
            vec!["--resolutions", "100000"],
            2,
            "each side must be at most 16384 pixels",
        ),
        (vec!["--resolutions", "8x100000000"], 2, "at most 16384"),
        (
            vec!["--resolutions", "16384"],
            1,
            "at most 262144 are supported",
        ),
        (
            vec!["--threads", "100000"],
            2,
            "--threads must be at most 1024",
        ),
    ] {
        let out_dir = dir.join("bundle");
        let mut full: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"compile", &"--model", &model, &"--out", &out_dir];
        full.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        let out = vit_msn(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!out_dir.exists());
    }
}

/// `num_labels` that disagrees with `id2label` is ignored, as transformers
/// does: the labels are id2label's.
#[test]
fn id2label_wins_over_num_labels() {
    let dir = scratch("compile-id2label");
    let model = dir.join("model");
    copy_model("classifier_regression", &model);
    edit_config(&model, |c| {
        c.insert("num_labels".into(), 7.into());
    });
    let bundle = dir.join("bundle");
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &bundle]),
        "compile",
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["model"]["labels"].as_array().unwrap().len(), 1);
}

/// A backbone's config may list more labels than its weights could hold a
/// head for (transformers saves them all): the size check counts a head only
/// for a classifier.
#[test]
fn backbone_config_with_many_labels_compiles() {
    let dir = scratch("compile-many-labels");
    let model = dir.join("model");
    copy_model("no_qkv_bias", &model);
    edit_config(&model, |c| {
        c.remove("id2label");
        c.remove("label2id");
        c.insert("num_labels".into(), 40_000.into());
    });
    common::assert_ok(
        &vit_msn(&[
            &"compile",
            &"--model",
            &model,
            &"--out",
            &dir.join("bundle"),
        ]),
        "compile a backbone whose config lists 40000 labels",
    );
}

/// `--out` through a symlink updates the bundle it points to (the link stays);
/// `--out .` is refused clearly (a rename cannot replace the current folder).
#[test]
fn output_folders_through_symlinks_and_dot() {
    let dir = scratch("compile-out-symlink");
    let model = common::case_dir("no_qkv_bias").join("model");
    let release = dir.join("release-1");
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &model, &"--out", &release]),
        "compile",
    );
    let current = dir.join("current");
    std::os::unix::fs::symlink("release-1", &current).unwrap();
    let before = std::fs::read(release.join("manifest.json")).unwrap();
    common::assert_ok(
        &vit_msn(&[
            &"compile",
            &"--model",
            &model,
            &"--out",
            &current,
            &"--resolutions",
            &"40",
        ]),
        "compile through the symlink",
    );
    assert!(std::fs::symlink_metadata(&current)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(
        std::fs::read(release.join("manifest.json")).unwrap(),
        before
    );
    assert!(release.join("model_40x40.pt").is_file());

    for (args, cwd) in [
        (
            vec!["compile", "--model", model.to_str().unwrap(), "--out", "."],
            &release,
        ),
        (
            vec![
                "init",
                "--config",
                model.join("config.json").to_str().unwrap(),
                "--out",
                ".",
            ],
            &dir.join("empty"),
        ),
    ] {
        std::fs::create_dir_all(cwd).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(&args)
            .current_dir(cwd)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is the current folder, which cannot be replaced"),
            "{args:?}: {err}"
        );
    }
    assert!(release.join("manifest.json").is_file());
}
