//! AMQP field values ⇄ JSON, the way py-amqp maps Python values: for showing
//! headers to people (dead-letter listings, snapshots) and for replaying
//! captured Celery messages in tests.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use serde_json::{Map, Number, Value};

/// An AMQP value as JSON. Byte arrays and non-UTF-8 strings become lossy
/// strings; decimals become numbers; timestamps become integers.
pub fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let v = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .into_iter()
        .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
        .collect()
}

/// The text of a string-typed AMQP value; `None` for other types and for
/// bytes that are not UTF-8.
pub fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An AMQP short string (at most 255 bytes), cut at a character boundary
/// rather than panicking as `ShortString::from` does on longer input.
pub fn short_string(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&s[..end]).unwrap_or_default()
}

/// JSON as py-amqp would encode the equivalent Python value: `None` → void,
/// small ints → 32-bit, big ints → 64-bit, floats → double, str → long string.
pub fn from_json(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => match i32::try_from(i) {
                Ok(small) => AMQPValue::LongInt(small),
                Err(_) => AMQPValue::LongLongInt(i),
            },
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(from_json).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(table_from_json(map)),
    }
}

/// Keys longer than AMQP's 255-byte short-string limit are dropped rather
/// than panicking: they cannot travel as header names anyway.
pub fn table_from_json(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in map {
        if let Ok(key) = ShortString::try_new(k.as_str()) {
            table.insert(key, from_json(v));
        }
    }
    table
}

/// A captured message (`{"properties": {...}, "headers": {...}}`, the shape
/// of the Celery fixtures and of [`crate::envelope::describe`]) as AMQP
/// properties: how tests replay what a foreign client published.
pub fn properties_from_json(message: &Value) -> BasicProperties {
    let p = &message["properties"];
    let text = |k: &str| p[k].as_str().map(short_string);
    let byte = |k: &str| p[k].as_u64().and_then(|v| u8::try_from(v).ok());
    let mut props = BasicProperties::default();
    if let Some(headers) = message["headers"].as_object() {
        props = props.with_headers(table_from_json(headers));
    }
    if let Some(v) = text("content_type") {
        props = props.with_content_type(v);
    }
    if let Some(v) = text("content_encoding") {
        props = props.with_content_encoding(v);
    }
    if let Some(v) = text("correlation_id") {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = text("reply_to") {
        props = props.with_reply_to(v);
    }
    if let Some(v) = text("expiration") {
        props = props.with_expiration(v);
    }
    if let Some(v) = byte("delivery_mode") {
        props = props.with_delivery_mode(v);
    }
    if let Some(v) = byte("priority") {
        props = props.with_priority(v);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_strings_are_cut_at_char_boundaries() {
        let long = "é".repeat(200);
        let cut = short_string(&long);
        assert_eq!(cut.as_str().len(), 254);
        assert_eq!(short_string("abc").as_str(), "abc");
    }

    #[test]
    fn json_round_trips_through_amqp() {
        let v = json!({"s": "x", "n": 7, "big": 1u64 << 40, "f": 1.5, "none": null,
                       "list": [1, null, "a"], "nested": {"t": true}});
        let Value::Object(map) = &v else {
            unreachable!()
        };
        assert_eq!(Value::Object(table_to_json(&table_from_json(map))), v);
    }
}
