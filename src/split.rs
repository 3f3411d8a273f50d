//! A CPU batch split into equal parts, each run at once on a thread of its
//! own with one intra-op thread, instead of one call on every intra-op
//! thread.
//!
//! The parts never wait on each other's OpenMP barriers, and what one thread
//! does alone (the interpreter, small ops, allocation) no longer stalls the
//! other. On the 2-core Zen 4 machine a batch-8 bf16 pass of vit-msn-small
//! is about 9% faster as two halves (`benches/batch_split.py`); f32 is
//! level, so only bf16 splits. int8 never does: its activations are
//! quantized per tensor over the whole batch, so halves would compute
//! other numbers. The results are the ones the whole batch gets (a test
//! compares).

use std::ffi::{c_int, CStr};

use tch::Tensor;

use crate::artifact::{Artifact, RawOutput};
use crate::bundle::outputs_by_name;
use crate::manifest::TensorSpec;

/// Into how many parts a batch of `batch` splits when the caller runs
/// `threads` intra-op threads: one per thread, if they come out equal.
pub(crate) fn parts(batch: i64, threads: i64) -> Option<i64> {
    (threads >= 2 && batch >= threads && batch % threads == 0).then_some(threads)
}

/// `module`'s forward on `parts` equal parts of the batch at once, the
/// outputs joined again along each one's batch dimension (the -1 of its
/// spec). `inputs` are pixel_values, bool_masked_pos and head_mask.
pub(crate) fn forward(
    module: &Artifact,
    specs: &[TensorSpec],
    inputs: [&Tensor; 3],
    parts: i64,
) -> Result<Vec<RawOutput>, String> {
    let [pixel_values, mask, head_mask] = inputs;
    let torch = |e: tch::TchError| e.to_string();
    let pixels = pixel_values.f_tensor_split(parts, 0).map_err(torch)?;
    let masks = mask.f_tensor_split(parts, 0).map_err(torch)?;
    let results: Vec<Result<Vec<RawOutput>, String>> = std::thread::scope(|s| {
        let running: Vec<_> = pixels
            .into_iter()
            .zip(masks)
            .map(|(p, m)| {
                let h = head_mask.shallow_clone();
                s.spawn(move || {
                    one_intra_op_thread();
                    module.forward(&[&p, &m, &h])
                })
            })
            .collect();
        running
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err("a batch part's thread panicked".into()))
            })
            .collect()
    });
    let mut results = results
        .into_iter()
        .map(|r| r.map(|outputs| outputs_by_name(specs, outputs)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = results.remove(0);
    let mut joined = Vec::with_capacity(first.len());
    for (i, (name, tensor)) in first.into_iter().enumerate() {
        let Some(dim) = specs
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.shape.iter().position(|&d| d < 0))
        else {
            return Err(format!(
                "output `{name}` has no batch dimension to join along"
            ));
        };
        let mut pieces = vec![tensor];
        for rest in &mut results {
            match rest.get_mut(i) {
                Some((n, t)) if *n == name => pieces.push(t.shallow_clone()),
                _ => {
                    return Err(format!(
                        "the batch parts returned different outputs at `{name}`"
                    ))
                }
            }
        }
        joined.push((
            Some(name),
            Tensor::f_cat(&pieces, dim as i64).map_err(torch)?,
        ));
    }
    Ok(joined)
}

/// Makes this thread run libtorch's ops on itself alone. OpenMP's team size
/// and MKL's thread count are both settings of the calling thread;
/// `at::set_num_threads` would also change the default that every thread
/// started later takes.
fn one_intra_op_thread() {
    // libtorch gives a thread its OpenMP team size the first time the thread
    // asks for it; asking first keeps that from undoing what follows.
    let _ = tch::get_num_threads();
    // SAFETY: each symbol, where the process has it, is the C function of
    // that signature (OpenMP's and MKL's documented APIs).
    unsafe {
        if let Some(f) = symbol(c"omp_set_num_threads") {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(c_int)>(f)(1);
        }
        // MKL's C name; the lower-case one takes a pointer (Fortran's).
        if let Some(f) = symbol(c"MKL_Set_Num_Threads_Local") {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(c_int) -> c_int>(f)(1);
        }
    }
}

fn symbol(name: &CStr) -> Option<*mut libc::c_void> {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches what is loaded.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!f.is_null()).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::parts;

    #[test]
    fn splits_only_into_equal_parts_of_two_or_more() {
        assert_eq!(parts(8, 2), Some(2));
        assert_eq!(parts(2, 2), Some(2));
        assert_eq!(parts(12, 4), Some(4));
        assert_eq!(parts(1, 2), None);
        assert_eq!(parts(7, 2), None);
        assert_eq!(parts(8, 1), None);
        assert_eq!(parts(2, 4), None);
    }
}
