//! Bundles that users download or edit by hand: every broken one is a typed
//! error naming the file, never a crash; outputs are never half-written.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{compile_case, scratch, vit_msn};
use tch::{Device, Kind, Tensor};
use vit_msn::bundle::sha256_hex;
use vit_msn::Bundle;

/// A fresh copy of a small compiled bundle to break.
fn bundle_copy(name: &str) -> PathBuf {
    let src = compile_case("no_qkv_bias", &format!("bundle-errors-src-{name}"), &[]);
    let dir = scratch(&format!("bundle-error-{name}")).join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

/// Replaces the artifact with `bytes` and updates its digest, as someone
/// swapping a file by hand would.
fn swap_artifact(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("model_32x32.pt"), bytes).unwrap();
    let digest = sha256_hex(bytes);
    edit_manifest(dir, |v| v["artifacts"][0]["sha256"] = digest.into());
}

fn load_err(dir: &Path) -> String {
    match Bundle::load(dir, Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_bundles_are_refused_with_the_reason() {
    let d = bundle_copy("missing-manifest");
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("manifest.json") && e.contains("No such file"),
        "{e}"
    );

    let d = bundle_copy("invalid-manifest");
    std::fs::write(d.join("manifest.json"), "{\"format_version\": 1, ").unwrap();
    assert!(load_err(&d).contains("not valid JSON"));

    let d = bundle_copy("missing-field");
    edit_manifest(&d, |v| {
        v.as_object_mut().unwrap().remove("artifacts");
    });
    assert!(load_err(&d).contains("invalid manifest: missing field `artifacts`"));

    let d = bundle_copy("newer");
    edit_manifest(&d, |v| v["format_version"] = 99.into());
    assert!(load_err(&d).contains("format version 99 is newer than this program reads (1)"));

    let d = bundle_copy("escape");
    edit_manifest(&d, |v| {
        v["artifacts"][0]["file"] = "../../etc/passwd".into()
    });
    assert!(load_err(&d).contains("is not a plain file name"));

    let d = bundle_copy("missing-artifact");
    std::fs::remove_file(d.join("model_32x32.pt")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model_32x32.pt") && e.contains("No such file"),
        "{e}"
    );

    let d = bundle_copy("garbage");
    swap_artifact(&d, b"this is not TorchScript at all");
    let e = load_err(&d);
    assert!(e.contains("model_32x32.pt: cannot load TorchScript"), "{e}");

    // A FIFO in the artifact's place is refused, not opened (which would block).
    let d = bundle_copy("fifo");
    let fifo = d.join("model_32x32.pt");
    std::fs::remove_file(&fifo).unwrap();
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let e = load_err(&d);
    assert!(
        e.contains("model_32x32.pt") && e.contains("not a regular file"),
        "{e}"
    );
    let e = vit_msn::bundle::replace_artifact(&d, 32, 32, &fifo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");

    let d = bundle_copy("truncated");
    let bytes = std::fs::read(d.join("model_32x32.pt")).unwrap();
    swap_artifact(&d, &bytes[..bytes.len() / 3]);
    assert!(load_err(&d).contains("model_32x32.pt: cannot load TorchScript"));

    let d = bundle_copy("cuda");
    edit_manifest(&d, |v| v["device"] = "cuda:0".into());
    if vit_msn::device::cuda_device_count() == 0 {
        let e = load_err(&d);
        assert!(
            e.contains("compiled for cuda:0") && e.contains("no CUDA device"),
            "{e}"
        );
    }

    let d = bundle_copy("huge-manifest");
    let f = std::fs::File::options()
        .append(true)
        .open(d.join("manifest.json"))
        .unwrap();
    f.set_len(65 << 20).unwrap();
    assert!(load_err(&d).contains("too large for a manifest"));

    let d = bundle_copy("dtype");
    edit_manifest(&d, |v| v["dtype"] = "f8".into());
    assert!(load_err(&d).contains("unknown dtype `f8`"));
}

/// A TorchScript file whose forward takes only `pixel_values` (as
/// `torch.jit.trace(model, pixel_values)` gives) does not match the manifest.
#[test]
fn wrong_forward_signature_is_refused() {
    let d = bundle_copy("signature");
    let other = d.parent().unwrap().join("one_input.pt");
    let py = std::process::Command::new(common::root().join(".venv/bin/python"))
        .arg("-c")
        .arg(
            "import sys, torch\n\
             class M(torch.nn.Module):\n    def forward(self, pixel_values):\n        return pixel_values.mean()\n\
             torch.jit.trace(M(), torch.zeros(1, 3, 32, 32)).save(sys.argv[1])",
        )
        .arg(&other)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    swap_artifact(&d, &std::fs::read(&other).unwrap());
    let e = load_err(&d);
    assert!(
        e.contains("model_32x32.pt") && e.contains("warm-up run failed"),
        "{e}"
    );
}

#[test]
fn unwritable_output_fails_cleanly() {
    let bundle = compile_case("no_qkv_bias", "bundle-errors-output", &[]);
    let dir = scratch("bundle-errors-output-io");
    let inputs = dir.join("in.safetensors");
    let px = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    vit_msn::tensors::write_safetensors(&inputs, &[("pixel_values", &px)]).unwrap();
    // A path under a regular file cannot be created, even by root.
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--inputs",
        &inputs,
        &"--output",
        &blocker.join("out.safetensors"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not-a-dir"), "{err}");
    // An existing output is replaced whole or left as it was: never truncated.
    let target = dir.join("out.safetensors");
    std::fs::write(&target, "previous").unwrap();
    let bad_inputs = dir.join("bad.safetensors");
    std::fs::write(&bad_inputs, "garbage").unwrap();
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--inputs",
        &bad_inputs,
        &"--output",
        &target,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "previous");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains(".tmp-")),
        "{leftovers:?}"
    );
}

/// 8 threads × 50 forward passes with different inputs on one bundle: every
/// result is bitwise the result of the same input run alone.
#[test]
fn eight_threads_fifty_passes_bitwise() {
    let bundle = Arc::new(
        Bundle::load(
            compile_case("sdpa", "bundle-errors-threads", &[]),
            Device::Cpu,
        )
        .unwrap(),
    );
    tch::manual_seed(11);
    let inputs: Vec<Tensor> = (0..8)
        .map(|_| Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)))
        .collect();
    let alone: Vec<Tensor> = inputs
        .iter()
        .map(|px| {
            bundle
                .forward(px, None, None)
                .unwrap()
                .last_hidden_state
                .unwrap()
        })
        .collect();
    let handles: Vec<_> = inputs
        .iter()
        .zip(alone)
        .map(|(px, expected)| {
            let (bundle, px) = (Arc::clone(&bundle), px.copy());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let got = bundle
                        .forward(&px, None, None)
                        .unwrap()
                        .last_hidden_state
                        .unwrap();
                    assert!(
                        got.equal(&expected),
                        "a result differs from the same input run alone"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Killing `compile` part-way leaves the old bundle (or the new, complete
/// one), never a mix; the next compile clears the leftovers.
#[test]
fn interrupted_compile_leaves_the_old_bundle() {
    let dir = scratch("bundle-errors-interrupt");
    let target = dir.join("bundle");
    let small = common::case_dir("base").join("model");
    let big = common::case_dir("vit_msn_small").join("model");
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &small, &"--out", &target]),
        "first compile",
    );
    let old_manifest = std::fs::read_to_string(target.join("manifest.json")).unwrap();
    for delay_ms in [50u64, 300, 800] {
        let mut child = std::process::Command::new(common::bin())
            .args(["compile", "--model"])
            .arg(&big)
            .arg("--out")
            .arg(&target)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let manifest = std::fs::read_to_string(target.join("manifest.json")).unwrap();
        if manifest != old_manifest {
            // The new bundle landed whole before the kill.
            Bundle::load(&target, Device::Cpu).unwrap();
            return;
        }
        Bundle::load(&target, Device::Cpu).unwrap();
    }
    // A later compile cleans up what the killed ones staged.
    common::assert_ok(
        &vit_msn(&[&"compile", &"--model", &small, &"--out", &target]),
        "compile again",
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["bundle"], "leftovers: {names:?}");
}

/// A full disk: the run fails with the OS's reason, the previous output stays
/// as it was, and nothing half-written is left (a 16 KiB tmpfs, mounted as
/// root, stands in for the disk).
#[test]
fn full_disk_leaves_nothing_half_written() {
    let bundle = compile_case(
        "base",
        "bundle-errors-full-disk",
        &["--outputs", "hidden_states,attentions"],
    );
    let dir = scratch("bundle-errors-full-disk-mnt");
    let mnt = dir.join("disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "this test mounts a small tmpfs and needs root");
    let target = mnt.join("out.safetensors");
    std::fs::write(&target, "previous").unwrap();
    let out = vit_msn(&[
        &"run",
        &"--bundle",
        &bundle,
        &"--inputs",
        &common::case_dir("base").join("plain_32x32.in.safetensors"),
        &"--output",
        &target,
    ]);
    let listing: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let previous = std::fs::read_to_string(&target).unwrap();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("out.safetensors"),
        "{err}"
    );
    assert_eq!(previous, "previous");
    assert_eq!(listing, ["out.safetensors"], "left behind: {listing:?}");
}

/// Hand-edited sizes that used to panic or abort at load, warm-up or
/// preprocessing are refused by `Manifest::validate`, naming the field.
#[test]
fn out_of_range_manifest_sizes_are_refused_by_name() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 7] = [
        (
            "height",
            |v| v["artifacts"][0]["height"] = 100000.into(),
            "artifact `model_32x32.pt`: `height` must be in 8..=16384, found 100000",
        ),
        (
            "width",
            |v| v["artifacts"][0]["width"] = 100000.into(),
            "`width` must be in 8..=16384",
        ),
        (
            "layers",
            |v| v["model"]["num_hidden_layers"] = (1i64 << 40).into(),
            "`model.num_hidden_layers` must be in 0..=4096, found 1099511627776",
        ),
        (
            "heads",
            |v| v["model"]["num_attention_heads"] = 5000.into(),
            "`model.num_attention_heads` must be in 1..=4096",
        ),
        (
            "channels",
            |v| v["model"]["num_channels"] = (1i64 << 40).into(),
            "`model.num_channels` must be in 1..=1024",
        ),
        (
            "hidden",
            |v| v["model"]["hidden_size"] = (1i64 << 40).into(),
            "`model.hidden_size` must be in 1..=65536",
        ),
        (
            "image-size",
            |v| {
                v["preprocessing"] = serde_json::Value::Null;
                v["model"]["image_size"] = (-5).into();
            },
            "`model.image_size` must be in 1..=16384, found -5",
        ),
    ];
    for (name, edit, needle) in cases {
        let d = bundle_copy(&format!("sizes-{name}"));
        edit_manifest(&d, edit);
        let e = load_err(&d);
        assert!(
            e.contains("manifest.json") && e.contains(needle),
            "{name}: {e}"
        );
    }
}

/// A fresh copy of a small classifier bundle (4 labels, 32x32) to break.
fn classifier_copy(name: &str) -> PathBuf {
    let src = compile_case(
        "classifier_multilabel",
        &format!("bundle-errors-src-cls-{name}"),
        &[],
    );
    let dir = scratch(&format!("bundle-error-cls-{name}")).join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

/// Labels, layers and heads that disagree with the artifact specs in the
/// manifest, or (edited on both sides) with the artifact's own
/// `vit_msn.json`, are refused at load rather than misnaming classes or
/// running a head mask the graph does not have.
#[test]
fn manifest_facts_that_disagree_with_the_artifact_are_refused() {
    let d = classifier_copy("labels");
    edit_manifest(&d, |v| v["model"]["labels"] = serde_json::json!(["only"]));
    let e = load_err(&d);
    assert!(
        e.contains("output `logits` has shape [-1, 4], but `model.labels` names 1 classes"),
        "{e}"
    );

    let d = classifier_copy("labels-and-spec");
    edit_manifest(&d, |v| {
        v["model"]["labels"] = serde_json::json!(["a", "b", "c"]);
        v["artifacts"][0]["outputs"][0]["shape"] = serde_json::json!([-1, 3]);
    });
    let e = load_err(&d);
    assert!(
        e.contains("model_32x32.pt")
            && e.contains(
                "output `logits` shape [-1, 3], but the artifact was compiled for [-1, 4]"
            ),
        "{e}"
    );

    let d = classifier_copy("layers");
    edit_manifest(&d, |v| v["model"]["num_hidden_layers"] = 3.into());
    let e = load_err(&d);
    assert!(
        e.contains("input `head_mask` has shape [2, 4], but `model` implies [3, 4]"),
        "{e}"
    );

    let d = classifier_copy("layers-and-spec");
    edit_manifest(&d, |v| {
        v["model"]["num_hidden_layers"] = 3.into();
        v["artifacts"][0]["inputs"][2]["shape"] = serde_json::json!([3, 4]);
    });
    let e = load_err(&d);
    assert!(
        e.contains("input `head_mask` shape [3, 4], but the artifact was compiled for [2, 4]"),
        "{e}"
    );

    let d = classifier_copy("heads-and-spec");
    edit_manifest(&d, |v| {
        v["model"]["num_attention_heads"] = 5.into();
        v["artifacts"][0]["inputs"][2]["shape"] = serde_json::json!([2, 5]);
    });
    let e = load_err(&d);
    assert!(
        e.contains("input `head_mask` shape [2, 5], but the artifact was compiled for [2, 4]"),
        "{e}"
    );

    // The unedited copy still loads.
    Bundle::load(classifier_copy("unedited"), Device::Cpu).unwrap();
}

/// `fewshot fit` keeps a `cache/` folder in the backbone bundle: replacing
/// an artifact keeps it (and any other sub-folder), whole.
#[test]
fn replace_keeps_sub_folders() {
    let d = bundle_copy("replace-cache");
    std::fs::create_dir_all(d.join("cache/deeper")).unwrap();
    std::fs::write(d.join("cache/index.json"), "{}").unwrap();
    std::fs::write(d.join("cache/deeper/emb.bin"), "embedding").unwrap();
    let new = d.parent().unwrap().join("new.pt");
    std::fs::copy(d.join("model_32x32.pt"), &new).unwrap();
    vit_msn::bundle::replace_artifact(&d, 32, 32, &new).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("cache/deeper/emb.bin")).unwrap(),
        "embedding"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("cache/index.json")).unwrap(),
        "{}"
    );
    Bundle::load(&d, Device::Cpu).unwrap();
}

/// An artifact compiled for another resolution with as many patches (64x16
/// in the 32x32 slot) passes the probe run, but its own `vit_msn.json`
/// says what it is: refused, as loading would refuse it, and the bundle is
/// left as it was. Another dtype is refused by name, not by libtorch's
/// message.
#[test]
fn replace_refuses_an_artifact_compiled_for_another_slot() {
    let d = bundle_copy("replace-resolution");
    let manifest_before = std::fs::read(d.join("manifest.json")).unwrap();
    let wide = compile_case(
        "no_qkv_bias",
        "bundle-errors-src-64x16",
        &["--resolutions", "64x16"],
    );
    let e = vit_msn::bundle::replace_artifact(&d, 32, 32, &wide.join("model_64x16.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model_64x16.pt")
            && e.contains(
                "input `pixel_values` shape [-1, 3, 32, 32], but the artifact was compiled for [-1, 3, 64, 16] (its vit_msn.json)"
            ),
        "{e}"
    );
    let bf16 = compile_case(
        "no_qkv_bias",
        "bundle-errors-src-bf16",
        &["--dtype", "bf16"],
    );
    let e = vit_msn::bundle::replace_artifact(&d, 32, 32, &bf16.join("model_32x32.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("it was compiled for bf16, and the bundle's artifacts are f32"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(d.join("manifest.json")).unwrap(),
        manifest_before
    );
    Bundle::load(&d, Device::Cpu).unwrap();
}

/// Locks the folder as `bundle replace` does; held until dropped.
fn hold_lock(dir: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).unwrap();
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// One `bundle replace` at a time: a second one waits (`--wait` seconds)
/// or fails clearly; two started together both land, and the bundle loads
/// with both new digests (it used to be left with a digest mismatch).
#[test]
fn concurrent_replaces_take_turns() {
    let dir = scratch("bundle-errors-concurrent");
    let config = common::case_dir("no_qkv_bias").join("model/config.json");
    let seeded = dir.join("seeded-model");
    common::assert_ok(
        &vit_msn(&[
            &"init",
            &"--config",
            &config,
            &"--out",
            &seeded,
            &"--seed",
            &"5",
        ]),
        "init",
    );
    let new = dir.join("new");
    common::assert_ok(
        &vit_msn(&[
            &"compile",
            &"--model",
            &seeded,
            &"--out",
            &new,
            &"--resolutions",
            &"32,48x40",
        ]),
        "compile the new artifacts",
    );
    let original = compile_case(
        "no_qkv_bias",
        "bundle-errors-concurrent-src",
        &["--resolutions", "32,48x40"],
    );
    let target = dir.join("bundle");
    let fresh = || {
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target).unwrap();
        for e in std::fs::read_dir(&original).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), target.join(e.file_name())).unwrap();
        }
    };
    let replace = |res: &str, wait: &str| {
        let file = new.join(format!(
            "model_{}.pt",
            if res == "32" { "32x32" } else { res }
        ));
        let mut cmd = std::process::Command::new(common::bin());
        cmd.args(["bundle", "replace", "--bundle"])
            .arg(&target)
            .args(["--resolution", res, "--artifact"])
            .arg(file)
            .args(["--wait", wait])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };

    // Held by someone else: --wait 0 fails at once, naming the reason.
    fresh();
    let lock = hold_lock(&target);
    let out = replace("32", "0").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another process is changing this bundle") && !err.contains("panicked"),
        "{err}"
    );
    // With time to wait, it waits, then lands once the holder lets go.
    let mut waiting = replace("32", "60").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(waiting.try_wait().unwrap().is_none(), "did not wait");
    drop(lock);
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for round in 0..2 {
        fresh();
        let a = replace("32", "120").spawn().unwrap();
        let b = replace("48x40", "120").spawn().unwrap();
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Bundle::load(&target, Device::Cpu).unwrap_or_else(|e| panic!("round {round}: {e}"));
        for file in ["model_32x32.pt", "model_48x40.pt"] {
            assert_eq!(
                std::fs::read(target.join(file)).unwrap(),
                std::fs::read(new.join(file)).unwrap(),
                "round {round}: {file} was not replaced"
            );
        }
    }
}

/// Cleaning up after killed writers spares the staging of a live one.
#[test]
fn stale_sibling_cleanup_spares_live_writers() {
    let dir = scratch("bundle-errors-stale-siblings");
    let target = dir.join("bundle");
    let mut alive = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let live = dir.join(format!(".bundle.tmp-{}", alive.id()));
    let dead = dir.join(format!(".bundle.tmp-{}", gone.id()));
    for staged in [&live, &dead] {
        std::fs::create_dir_all(staged).unwrap();
        std::fs::write(staged.join("manifest.json"), "{}").unwrap();
    }
    vit_msn::fsutil::remove_stale_siblings(&target);
    let _ = alive.kill();
    let _ = alive.wait();
    assert!(
        live.join("manifest.json").is_file(),
        "a live writer's staging was removed"
    );
    assert!(!dead.exists(), "a dead writer's staging was left");
}

fn bench(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (Option<i32>, String, String) {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench"];
    all.extend_from_slice(args);
    let out = vit_msn(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

/// Batch sizes and pass counts that used to panic or abort (randn could not
/// allocate, the batch arithmetic overflowed, the timings' capacity
/// overflowed) are refused by name before anything is loaded.
#[test]
fn bench_refuses_out_of_range_sizes() {
    let bundle = compile_case(
        "no_qkv_bias",
        "bundle-errors-bench-sizes",
        &["--resolutions", "32,256"],
    );
    // Out of range: a usage error (2). Too large for memory: a failure (1).
    let cases: [(&[&str], i32, &str); 8] = [
        (
            &["--batch", "100000000", "--iters", "1"],
            2,
            "input `batch`: batch size 100000000 is not in 1..=65536",
        ),
        (
            &["--batch", "9223372036854775807", "--iters", "1"],
            2,
            "batch size 9223372036854775807 is not in 1..=65536",
        ),
        (&["--batch", "0"], 2, "batch size 0 is not in 1..=65536"),
        (
            &["--batch", "1", "--iters", "18446744073709551615"],
            2,
            "input `iters`: 18446744073709551615 is not in 1..=1000000",
        ),
        (
            &["--batch", "1", "--iters", "1000000000000"],
            2,
            "input `iters`: 1000000000000 is not in 1..=1000000",
        ),
        (
            &["--batch", "1", "--warmup", "1000000000000"],
            2,
            "input `warmup`: 1000000000000 is not in 0..=1000000",
        ),
        (
            &["--batch", "1", "--cuda-graphs"],
            2,
            "--cuda-graphs needs --device cuda",
        ),
        // In range, but about a TiB by the runtime's estimate: refused
        // before the input is allocated.
        (
            &["--batch", "65536", "--resolution", "256"],
            1,
            "a batch of 65536 needs about",
        ),
    ];
    for (extra, expected_code, needle) in cases {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--bundle", &bundle];
        for e in extra {
            args.push(e);
        }
        let (code, _, err) = bench(&args);
        assert_eq!(code, Some(expected_code), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

/// Hostile TorchScript archives are refused before libtorch reads them, in a
/// bundle (digest updated) and as a bare file (`inspect`): tensor constants
/// whose records the zip directory gives 0 bytes (libtorch read past them: a
/// segfault while loading), and a pickle memo index of 2^31 - 1 (libtorch
/// grew its memo table to it).
#[test]
fn hostile_torchscript_archives_are_refused() {
    let original = std::fs::read(bundle_copy("ts-original").join("model_32x32.pt")).unwrap();
    let mut emptied = original.clone();
    assert!(common::resize_zip_records(&mut emptied, "/constants/", 0) > 0);
    let d = bundle_copy("ts-emptied");
    let bomb_file = d.join("bomb.pt");
    std::fs::write(&bomb_file, &original).unwrap();
    // constants.pkl starts `PROTO 2, MARK, GLOBAL torch._utils _rebuild_tensor_v2, BINPUT 0`.
    common::patch_file(
        &bomb_file,
        b"_rebuild_tensor_v2\nq\x00",
        19,
        b"r\xff\xff\xff\x7f",
    );
    let bomb = std::fs::read(&bomb_file).unwrap();
    for (name, bytes, expected) in [
        (
            "ts-emptied",
            &emptied,
            "constants.pkl: a tensor of shape [32, 3, 8, 8] (strides [192, 64, 8, 1], offset 0) does not fit the 0 bytes the file holds for it",
        ),
        (
            "ts-bomb",
            &bomb,
            "constants.pkl: memo index 2147483647 is beyond anything a pickle of",
        ),
    ] {
        let d = bundle_copy(name);
        swap_artifact(&d, bytes);
        let e = load_err(&d);
        assert!(e.contains("model_32x32.pt: cannot load TorchScript") && e.contains(expected), "{name}: {e}");
        let out = vit_msn(&[&"inspect", &d.join("model_32x32.pt")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

/// A baseline is compared only with a run of the same thing: one that holds
/// none of the batch sizes run, measured at another dtype, resolution,
/// device or model shape, or with medians that are not positive times, is
/// refused; batch sizes it lacks are listed. `--max-regression` is always
/// a percentage.
#[test]
fn bench_baselines_are_compared_like_with_like() {
    let bundle = compile_case("no_qkv_bias", "bundle-errors-bench-baseline", &[]);
    let dir = scratch("bundle-errors-bench-baseline-files");
    let saved = dir.join("base.json");
    let run = ["--iters", "2", "--warmup", "0"];
    let (code, _, err) = bench(&[
        &"--bundle",
        &bundle,
        &"--batch",
        &"1",
        &run[0],
        &run[1],
        &run[2],
        &run[3],
        &"--save-baseline",
        &saved,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert!(base["model"].as_str().unwrap().contains("hidden size 32"));
    let r = &base["results"][0];
    let (min, median, p90) = (
        r["min_ms"].as_f64().unwrap(),
        r["median_ms"].as_f64().unwrap(),
        r["p90_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= median && median <= p90, "{r}");
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        edit(&mut v);
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, v.to_string()).unwrap();
        path
    };
    let compare = |baseline: &Path, batch: &str, max: &str| {
        bench(&[
            &"--bundle",
            &bundle,
            &"--batch",
            &batch,
            &run[0],
            &run[1],
            &run[2],
            &run[3],
            &"--baseline",
            &baseline,
            &"--max-regression",
            &max,
        ])
    };
    type Edit = fn(&mut serde_json::Value);
    let refused: [(&str, Edit, &str); 8] = [
        (
            "other-batch",
            |v| v["results"][0]["batch"] = 64.into(),
            "the baseline holds no result for batch size(s) 1 (it has only batch size(s) 64); nothing to compare",
        ),
        (
            "empty",
            |v| v["results"] = serde_json::json!([]),
            "holds no result for batch size(s) 1 (it has no results)",
        ),
        (
            "zero",
            |v| v["results"][0]["median_ms"] = 0.0.into(),
            "batch 1: median 0 ms is not a positive time",
        ),
        (
            "negative",
            |v| v["results"][0]["median_ms"] = (-1.0).into(),
            "batch 1: median -1 ms is not a positive time",
        ),
        (
            "dtype",
            |v| v["dtype"] = "bf16".into(),
            "the baseline was measured with dtype bf16, this run uses f32",
        ),
        (
            "resolution",
            |v| v["height"] = 224.into(),
            "measured with resolution 224x32, this run uses 32x32",
        ),
        (
            "device",
            |v| v["device"] = "cuda:0".into(),
            "measured with device cuda:0, this run uses cpu",
        ),
        (
            "model",
            |v| v["model"] = "backbone with hidden size 768".into(),
            "measured on another model (backbone with hidden size 768); this bundle is a backbone with hidden size 32",
        ),
    ];
    for (name, edit, needle) in refused {
        let path = variant(name, &edit);
        let (code, out, err) = compare(&path, "1", "10%");
        assert_eq!(code, Some(1), "{name}: {out}{err}");
        assert!(
            err.contains(needle) && err.contains(&format!("{name}.json")),
            "{name}: {err}"
        );
    }

    // Batch sizes the baseline lacks are named; the others are compared. A
    // baseline saved before `model` and `min_ms` were recorded is still read.
    // Its median is a day, so that no stall of this run can fail the compare.
    let old = variant("old", &|v| {
        v.as_object_mut().unwrap().remove("model");
        v["results"][0].as_object_mut().unwrap().remove("min_ms");
        v["results"][0]["median_ms"] = 86_400_000.0.into();
    });
    let (code, _, err) = compare(&old, "1,2", "10%");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("has no result for batch size(s) 2; not compared"),
        "{err}"
    );

    // One rule for --max-regression: a number, with or without %, is percent.
    let fast = variant("fast", &|v| v["results"][0]["median_ms"] = 1e-9.into());
    for (given, allowed) in [
        ("1", "allowed 1%"),
        ("1.0", "allowed 1%"),
        ("1.5", "allowed 1.5%"),
        ("0.5", "allowed 0.5%"),
        ("10%", "allowed 10%"),
    ] {
        let (code, _, err) = compare(&fast, "1", given);
        assert_eq!(code, Some(1), "{given}: {err}");
        assert!(err.contains(allowed), "{given}: {err}");
    }

    // Updating a baseline in place: a run that fails the comparison leaves it
    // as it was, so the slower numbers never become the reference.
    let before = std::fs::read(&fast).unwrap();
    let (code, _, err) = bench(&[
        &"--bundle",
        &bundle,
        &"--batch",
        &"1",
        &run[0],
        &run[1],
        &run[2],
        &run[3],
        &"--baseline",
        &fast,
        &"--save-baseline",
        &fast,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not saved"), "{err}");
    assert_eq!(std::fs::read(&fast).unwrap(), before);
}

/// A compile over an existing bundle takes the same lock as `bundle replace`:
/// it waits while another process changes the bundle, then lands.
#[test]
fn compile_over_a_bundle_waits_for_its_lock() {
    let bundle = compile_case("no_qkv_bias", "bundle-errors-compile-lock", &[]);
    let model = common::case_dir("no_qkv_bias").join("model");
    let lock = hold_lock(&bundle);
    let mut compile = std::process::Command::new(common::bin())
        .args(["compile", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&bundle)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The new bundle is finished beside the old one, and then it waits.
    let staged_manifest = bundle
        .with_file_name(format!(".bundle.tmp-{}", compile.id()))
        .join("manifest.json");
    let start = std::time::Instant::now();
    while !staged_manifest.exists() {
        assert!(compile.try_wait().unwrap().is_none(), "compile ended early");
        assert!(
            start.elapsed().as_secs() < 120,
            "compile never finished staging"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        compile.try_wait().unwrap().is_none(),
        "did not wait for the lock"
    );
    assert!(
        staged_manifest.exists(),
        "replaced the bundle while it was locked"
    );
    drop(lock);
    let out = compile.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!staged_manifest.exists());
    Bundle::load(&bundle, Device::Cpu).unwrap();
}

/// `bundle pack` (what graph/python/export.py ends with) writes through the
/// same writer as compile: the packed bundle holds the same manifest facts
/// and runs to the reference; files without a description, of mixed dtypes,
/// or none at all are refused and nothing is written.
#[test]
fn pack_writes_what_compile_writes_and_refuses_what_it_cannot_describe() {
    let case = "base";
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::case_dir(case).join("case.json")).unwrap(),
    )
    .unwrap();
    let args: Vec<&str> = spec["compile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let compiled = compile_case(case, "bundle-errors-pack-src", &args);
    let model = common::case_dir(case).join("model");
    let work = scratch("bundle-errors-pack");
    let traced = work.join("traced");
    std::fs::create_dir_all(&traced).unwrap();
    for a in &vit_msn::Manifest::read(&compiled).unwrap().artifacts {
        std::fs::copy(compiled.join(&a.file), traced.join(&a.file)).unwrap();
    }
    let out = work.join("bundle");
    let pack = |artifacts: &Path, out: &Path| {
        vit_msn(&[
            &"bundle",
            &"pack",
            &"--model",
            &model,
            &"--artifacts",
            &artifacts,
            &"--out",
            &out,
            &"--producer",
            &"a test",
        ])
    };
    common::assert_ok(&pack(&traced, &out), "bundle pack");
    let (a, b) = (
        vit_msn::Manifest::read(&compiled).unwrap(),
        vit_msn::Manifest::read(&out).unwrap(),
    );
    assert_eq!(b.compiler, "a test");
    assert_eq!(
        serde_json::to_value(&a.model).unwrap(),
        serde_json::to_value(&b.model).unwrap()
    );
    // The trained resolution first, as compile lists it; then by file name.
    let mut listed = a.artifacts.clone();
    listed[1..].sort_by(|x, y| x.file.cmp(&y.file));
    assert_eq!(
        serde_json::to_value(&listed).unwrap(),
        serde_json::to_value(&b.artifacts).unwrap()
    );
    assert_eq!(
        serde_json::to_value(&a.source.weights).unwrap(),
        serde_json::to_value(&b.source.weights).unwrap()
    );
    assert_eq!(
        (a.task, a.dtype, a.preprocessing),
        (b.task, b.dtype, b.preprocessing)
    );
    common::check_runs(case, &out, &work, &[]);

    let refused = |artifacts: &Path, needle: &str| {
        let target = work.join("refused");
        let result = pack(artifacts, &target);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!target.exists());
    };
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(&empty, "holds no .pt files to pack");
    let plain = work.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("model_32x32.pt"), b"not a TorchScript archive").unwrap();
    refused(&plain, "has no readable extra/vit_msn.json description");
    let bf16 = compile_case(
        case,
        "bundle-errors-pack-bf16",
        &["--resolutions", "40", "--dtype", "bf16"],
    );
    std::fs::copy(bf16.join("model_40x40.pt"), plain.join("model_32x32.pt")).unwrap();
    std::fs::copy(compiled.join("model_32x32.pt"), plain.join("a.pt")).unwrap();
    refused(&plain, "a bundle has one task, dtype and device");
}
