//! Attention maps: how much the CLS token attends to each patch.

use tch::{Kind, Tensor};

use vit_msn::error::{Error, Result};

/// Which layer's attention to show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerChoice {
    Index(i64),
    Last,
    /// Attention rollout (Abnar & Zuidema, 2020): the product over layers of
    /// (attention + identity), each row renormalised.
    Rollout,
}

/// Which head: one, or the mean over heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeadChoice {
    Index(i64),
    Mean,
}

impl std::str::FromStr for LayerChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(LayerChoice::Last),
            "rollout" => Ok(LayerChoice::Rollout),
            n => n.parse().map(LayerChoice::Index).map_err(|_| {
                Error::input(
                    "layer",
                    format!("`{s}` is not a layer index, last or rollout"),
                )
            }),
        }
    }
}

impl std::str::FromStr for HeadChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(HeadChoice::Mean),
            n => n
                .parse()
                .map(HeadChoice::Index)
                .map_err(|_| Error::input("head", format!("`{s}` is not a head index or mean"))),
        }
    }
}

/// From `attentions` (layers, B, heads, T, T) of one forward pass, the CLS
/// token's attention over the patches of sample `b`, as a (T-1,) f32 tensor.
pub fn cls_attention(
    attentions: &Tensor,
    b: i64,
    layer: LayerChoice,
    head: HeadChoice,
) -> Result<Tensor> {
    let size = attentions.size();
    let [layers, batch, heads, tokens, _] = size[..] else {
        return Err(Error::input(
            "attentions",
            format!("expected 5 dimensions, found {size:?}"),
        ));
    };
    if layers == 0 {
        return Err(Error::input(
            "attentions",
            "the model has no layers, so there is no attention to show",
        ));
    }
    if !(0..batch).contains(&b) {
        return Err(Error::input(
            "attentions",
            format!("sample {b} is not in 0..{batch}"),
        ));
    }
    let per_layer = |l: i64| -> Result<Tensor> {
        let a = attentions.get(l).get(b).to_kind(Kind::Float); // (heads, T, T)
        Ok(match head {
            HeadChoice::Mean => a.mean_dim(0, false, Kind::Float),
            HeadChoice::Index(h) if (0..heads).contains(&h) => a.get(h),
            HeadChoice::Index(h) => {
                return Err(Error::input(
                    "head",
                    format!("head {h} is not in 0..{heads}"),
                ));
            }
        })
    };
    let map = match layer {
        LayerChoice::Last => per_layer(layers - 1)?,
        LayerChoice::Index(l) if (0..layers).contains(&l) => per_layer(l)?,
        LayerChoice::Index(l) => {
            return Err(Error::input(
                "layer",
                format!("layer {l} is not in 0..{layers}"),
            ))
        }
        LayerChoice::Rollout => {
            let eye = Tensor::eye(tokens, (Kind::Float, tch::Device::Cpu));
            let mut r = eye.shallow_clone();
            for l in 0..layers {
                let a = per_layer(l)? + &eye;
                let a = &a / a.sum_dim_intlist([-1].as_slice(), true, Kind::Float);
                r = a.matmul(&r);
            }
            r
        }
    };
    Ok(map.get(0).narrow(0, 1, tokens - 1))
}

/// Scales a (gh·gw,) score vector to [0, 1] on a (gh, gw) grid and resizes it
/// bilinearly to (height, width).
pub fn heat_grid(scores: &Tensor, gh: i64, gw: i64, height: i64, width: i64) -> Tensor {
    let g = scores.to_kind(Kind::Float).view([1, 1, gh, gw]);
    let (lo, hi) = (g.min(), g.max());
    let g = (&g - &lo) / (hi - &lo).clamp_min(1e-12);
    g.upsample_bilinear2d([height, width], false, None, None)
        .view([height, width])
}

/// The "turbo"-like colour of a value in [0, 1], as 8-bit RGB.
pub fn colormap(v: f32) -> [u8; 3] {
    // Piecewise-linear blue → cyan → yellow → red, readable on photos.
    let stops: [(f32, [f32; 3]); 5] = [
        (0.0, [48.0, 18.0, 59.0]),
        (0.25, [40.0, 140.0, 250.0]),
        (0.5, [60.0, 230.0, 120.0]),
        (0.75, [250.0, 190.0, 40.0]),
        (1.0, [180.0, 20.0, 10.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    for w in stops.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if v <= b {
            let t = (v - a) / (b - a);
            return [0, 1, 2].map(|i| (ca[i] + t * (cb[i] - ca[i])).round() as u8);
        }
    }
    [180, 20, 10]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_attentions() -> Tensor {
        tch::manual_seed(0);
        // (layers 2, batch 2, heads 3, tokens 5, tokens 5), rows summing to 1.
        Tensor::rand([2, 2, 3, 5, 5], (Kind::Float, tch::Device::Cpu)).softmax(-1, Kind::Float)
    }

    #[test]
    fn one_layer_one_head_is_the_cls_row() {
        let a = random_attentions();
        let got = cls_attention(&a, 1, LayerChoice::Index(0), HeadChoice::Index(2)).unwrap();
        assert_eq!(got, a.get(0).get(1).get(2).get(0).narrow(0, 1, 4));
        let last = cls_attention(&a, 0, LayerChoice::Last, HeadChoice::Mean).unwrap();
        let want = a
            .get(1)
            .get(0)
            .mean_dim(0, false, Kind::Float)
            .get(0)
            .narrow(0, 1, 4);
        assert!((last - want).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn rollout_multiplies_the_residual_attention() {
        let a = random_attentions();
        let eye = Tensor::eye(5, (Kind::Float, tch::Device::Cpu));
        let step = |l: i64| {
            let m = a.get(l).get(0).mean_dim(0, false, Kind::Float) + &eye;
            &m / m.sum_dim_intlist([-1].as_slice(), true, Kind::Float)
        };
        let want = step(1).matmul(&step(0)).get(0).narrow(0, 1, 4);
        let got = cls_attention(&a, 0, LayerChoice::Rollout, HeadChoice::Mean).unwrap();
        assert!((got - want).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn out_of_range_choices_are_errors() {
        let a = random_attentions();
        assert!(cls_attention(&a, 0, LayerChoice::Index(2), HeadChoice::Mean).is_err());
        assert!(cls_attention(&a, 0, LayerChoice::Last, HeadChoice::Index(3)).is_err());
        assert!(cls_attention(&a, 2, LayerChoice::Last, HeadChoice::Mean).is_err());
        assert!("rollout".parse::<LayerChoice>().is_ok() && "x".parse::<LayerChoice>().is_err());
    }
}
