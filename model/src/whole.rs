//! Whole numbers in JSON request bodies, counted as JSON Schema (and so OpenAPI's `integer`)
//! counts them: `14` and `14.0` alike. JSON has one number type, and encoders such as Python's
//! write `14.0` for a float that holds a whole number; serde's integers refuse it.

use serde::de::Error;
use serde::{Deserialize, Deserializer};

/// Exactly representable whole numbers of a float end here (2^53).
const EXACT: f64 = 9_007_199_254_740_992.0;

/// The number as a non-negative whole number, if it is one.
pub fn of(number: &serde_json::Number) -> Option<u64> {
    number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= EXACT)
            .map(|f| f as u64)
    })
}

fn convert<T: TryFrom<u64>, E: Error>(number: serde_json::Number) -> Result<T, E> {
    of(&number)
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| E::custom(format!("{number} is not a whole number in range")))
}

/// For `#[serde(deserialize_with = "eventbus_model::whole::required")]`.
pub fn required<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    convert(serde_json::Number::deserialize(d)?)
}

/// For `#[serde(default, deserialize_with = "eventbus_model::whole::optional")]`: absent or
/// `null` is `None`.
pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(convert)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct Request {
        #[serde(deserialize_with = "required")]
        seq: u64,
        #[serde(default, deserialize_with = "optional")]
        max: Option<u32>,
    }

    fn parse(json: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn whole_numbers_with_or_without_a_fraction_part() {
        let r = parse(r#"{"seq": 14.0, "max": 3}"#).unwrap();
        assert_eq!((r.seq, r.max), (14, Some(3)));
        let r = parse(r#"{"seq": 7, "max": null}"#).unwrap();
        assert_eq!((r.seq, r.max), (7, None));
        assert_eq!(parse(r#"{"seq": 1}"#).unwrap().max, None);
        assert_eq!(
            parse(r#"{"seq": 18446744073709551615}"#).unwrap().seq,
            u64::MAX
        );
        for bad in [
            r#"{"seq": 1.5}"#,
            r#"{"seq": -1}"#,
            r#"{"seq": -1.0}"#,
            r#"{"seq": "1"}"#,
            r#"{"seq": 1e300}"#,
            r#"{"seq": 1, "max": 4294967296}"#,
            r#"{"seq": null}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} was taken");
        }
    }
}
