//! Integers as JSON Schema counts them: `3.0` is the integer 3 (an `integer` is any number
//! with a zero fractional part), so a field the document calls an integer takes it, where
//! serde's own `i64` would refuse it. Fractions and out-of-range values are still refused
//! (and so answered 422 `invalid_request` / `invalid_query`).
//!
//! [`body`] reads JSON numbers only (a string is a type error, as the document says);
//! [`query`] reads a query string's text.

use std::fmt;

use serde::{
    de::{self, Visitor},
    Deserializer,
};

/// A whole number, from any of the forms a deserializer offers.
trait Whole: Sized + TryFrom<i64> + TryFrom<u64> {
    const NAME: &'static str;

    fn from_f64(v: f64) -> Option<Self>;
}

impl Whole for i64 {
    const NAME: &'static str = "a 64-bit integer";

    fn from_f64(v: f64) -> Option<Self> {
        // 2⁶³ is exact in f64. −2⁶³ is excluded too: a number just below it rounds to it
        // (i64::MIN itself arrives as an integer, not through here).
        let bound = -(i64::MIN as f64);
        (v.fract() == 0.0 && -bound < v && v < bound).then_some(v as i64)
    }
}

impl Whole for u64 {
    const NAME: &'static str = "an unsigned 64-bit integer";

    fn from_f64(v: f64) -> Option<Self> {
        // u64::MAX rounds up to 2⁶⁴, exact in f64: [0, 2⁶⁴) fits, and a number above
        // u64::MAX rounds to 2⁶⁴ or more.
        (v.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&v)).then_some(v as u64)
    }
}

struct WholeVisitor<T> {
    text: bool,
    _t: std::marker::PhantomData<T>,
}

impl<'de, T: Whole> Visitor<'de> for WholeVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", T::NAME)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        T::from_f64(v)
            .map(Some)
            .ok_or_else(|| E::invalid_value(de::Unexpected::Float(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if !self.text {
            return Err(E::invalid_type(de::Unexpected::Str(v), &self));
        }
        // Decimal text only, `3.0` as 3: through f64, 2⁶³ + 1 would round to 2⁶³.
        let whole = match v.split_once('.') {
            None => Some(v),
            Some((int, zeros)) if !zeros.is_empty() && zeros.bytes().all(|b| b == b'0') => {
                Some(int)
            }
            Some(_) => None,
        };
        if let Some(i) = whole.and_then(|w| w.parse::<i64>().ok()) {
            return self.visit_i64(i);
        }
        if let Some(u) = whole.and_then(|w| w.parse::<u64>().ok()) {
            return self.visit_u64(u);
        }
        Err(E::invalid_value(de::Unexpected::Str(v), &self))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn read<'de, D: Deserializer<'de>, T: Whole>(d: D, text: bool) -> Result<Option<T>, D::Error> {
    d.deserialize_option(WholeVisitor {
        text,
        _t: std::marker::PhantomData,
    })
}

/// `#[serde(default, deserialize_with = "…")]` for optional integers in a JSON body.
pub mod body {
    use super::*;

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        read(d, false)
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        read(d, false)
    }
}

/// `#[serde(default, deserialize_with = "…")]` for optional integers in a query string.
pub mod query {
    use super::*;

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        read(d, true)
    }
}

/// A whole number from a JSON number, for hand-written deserializers.
pub(super) fn whole_i64(v: f64) -> Option<i64> {
    i64::from_f64(v)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        #[serde(default, deserialize_with = "super::body::i64")]
        n: Option<i64>,
        #[serde(default, deserialize_with = "super::body::u64")]
        seed: Option<u64>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Query {
        #[serde(default, deserialize_with = "super::query::i64")]
        limit: Option<i64>,
    }

    fn body(v: serde_json::Value) -> Result<Body, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn integral_numbers_are_integers() {
        assert_eq!(body(json!({"n": 3.0})).unwrap().n, Some(3));
        assert_eq!(body(json!({"n": -2})).unwrap().n, Some(-2));
        assert_eq!(body(json!({ "n": i64::MIN })).unwrap().n, Some(i64::MIN));
        assert_eq!(body(json!({"n": null})).unwrap().n, None);
        assert_eq!(body(json!({})).unwrap().n, None);
        assert_eq!(
            body(json!({"seed": u64::MAX})).unwrap().seed,
            Some(u64::MAX)
        );
        assert_eq!(
            body(json!({"seed": 1e19})).unwrap().seed,
            Some(10u64.pow(19))
        );
        let below_min: serde_json::Value = serde_json::from_str("-9223372036854775809").unwrap();
        for bad in [
            json!(3.5),
            json!("3"),
            json!(1e19),
            json!(true),
            json!([1]),
            below_min,
        ] {
            assert!(body(json!({ "n": bad })).is_err(), "{bad}");
        }
        for bad in [json!(-1), json!(2e19), json!(0.5)] {
            assert!(body(json!({ "seed": bad })).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_text_is_read_as_a_number() {
        let q = |s: &str| {
            let uri: axum::http::Uri = format!("/?{s}").parse().unwrap();
            axum::extract::Query::<Query>::try_from_uri(&uri).map(|q| q.0)
        };
        assert_eq!(q("limit=3").unwrap().limit, Some(3));
        assert_eq!(q("limit=3.0").unwrap().limit, Some(3));
        assert_eq!(
            q("limit=-9223372036854775808").unwrap().limit,
            Some(i64::MIN)
        );
        assert_eq!(q("").unwrap().limit, None);
        for bad in [
            "limit=ten",
            "limit=3.5",
            "limit=3.",
            "limit=1e3",
            "limit=9223372036854775808",
            "limit=-9223372036854775809",
            "limit=",
            "limit=NaN",
        ] {
            assert!(q(bad).is_err(), "{bad}");
        }
    }
}
