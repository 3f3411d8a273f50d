//! An input's JSON `data`, flat or nested, read straight into one vector of
//! its kind: a `serde_json::Value` tree costs about ten times the body's
//! size in memory, which a 64 MiB body of numbers would make 700 MB.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// The scalars of a `data` array in row-major order, all of one kind.
#[derive(Debug, Default)]
pub enum Flat {
    #[default]
    Empty,
    Numbers(Vec<f64>),
    Bools(Vec<bool>),
    Strings(Vec<String>),
}

impl Flat {
    pub fn len(&self) -> usize {
        match self {
            Flat::Empty => 0,
            Flat::Numbers(v) => v.len(),
            Flat::Bools(v) => v.len(),
            Flat::Strings(v) => v.len(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Flat::Empty => "nothing",
            Flat::Numbers(_) => "numbers",
            Flat::Bools(_) => "booleans",
            Flat::Strings(_) => "strings",
        }
    }
}

enum Scalar {
    Number(f64),
    Bool(bool),
    String(String),
}

impl Flat {
    fn push(&mut self, x: Scalar) -> Result<(), String> {
        match (&mut *self, x) {
            (Flat::Empty, Scalar::Number(x)) => *self = Flat::Numbers(vec![x]),
            (Flat::Empty, Scalar::Bool(x)) => *self = Flat::Bools(vec![x]),
            (Flat::Empty, Scalar::String(x)) => *self = Flat::Strings(vec![x]),
            (Flat::Numbers(v), Scalar::Number(x)) => v.push(x),
            (Flat::Bools(v), Scalar::Bool(x)) => v.push(x),
            (Flat::Strings(v), Scalar::String(x)) => v.push(x),
            (flat, _) => return Err(format!("`data` mixes {} with other values", flat.kind())),
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut flat = Flat::Empty;
        Collect(&mut flat).deserialize(d)?;
        Ok(flat)
    }
}

/// Appends every scalar it meets, at any depth of nesting, to the one `Flat`.
struct Collect<'a>(&'a mut Flat);

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers, booleans or strings, flat or in nested arrays")
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<(), E> {
        self.0.push(Scalar::Number(x)).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> Result<(), E> {
        self.visit_f64(x as f64)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> Result<(), E> {
        self.visit_f64(x as f64)
    }

    fn visit_bool<E: de::Error>(self, x: bool) -> Result<(), E> {
        self.0.push(Scalar::Bool(x)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, x: &str) -> Result<(), E> {
        self.0
            .push(Scalar::String(x.to_string()))
            .map_err(E::custom)
    }

    fn visit_string<E: de::Error>(self, x: String) -> Result<(), E> {
        self.0.push(Scalar::String(x)).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Collect(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_agree() {
        let nested: Flat = serde_json::from_str("[[1, 2.5], [-3, 4]]").unwrap_or_default();
        let flat: Flat = serde_json::from_str("[1, 2.5, -3, 4]").unwrap_or_default();
        match (nested, flat) {
            (Flat::Numbers(a), Flat::Numbers(b)) => assert_eq!(a, b),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mixed_kinds_and_objects_are_refused() {
        for text in [r#"[1, true]"#, r#"["a", 1]"#, r#"[{"x": 1}]"#, r#"[null]"#] {
            assert!(serde_json::from_str::<Flat>(text).is_err(), "{text}");
        }
    }
}
