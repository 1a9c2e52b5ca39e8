//! Each built-in task's JSON Schema against its own `validate`: a schema
//! that refused an input the task accepts would tell clients (and code
//! generated from the API document) that a good request is bad. So every
//! input reached by mutating a valid example, field by field, that the
//! task accepts must satisfy the schema too; and the schema must still
//! say something (refuse unknown fields and wrong types).

use crate::{DynTask, Registry};
use serde_json::{Value, json};

/// A valid input for every built-in task.
fn examples() -> Vec<(&'static str, Value)> {
    let beneficiary = json!({
        "name": "Ada Lovelace", "iban": "DE89 3704 0044 0532 0130 00",
        "email": "ada@example.com", "country": "DE"
    });
    let address = json!({
        "name": "Ada", "street": "Unter den Linden 1", "postal_code": "10117",
        "city": "Berlin", "country": "DE"
    });
    vec![
        ("beneficiaries.create", beneficiary.clone()),
        (
            "beneficiaries.import",
            json!({ "beneficiaries": [beneficiary] }),
        ),
        ("echo", json!({ "value": {"a": [1, 2]} })),
        ("flaky", json!({ "fail_times": 2, "panic": false })),
        (
            "labels.generate",
            json!({ "shipments": [{ "reference": "REF-1", "weight_kg": 1.5, "address": address }] }),
        ),
        ("multiply", json!({ "x": 6, "y": 7 })),
        ("noop", json!({})),
        ("sleep", json!({ "seconds": 0.5 })),
        ("sum", json!({ "values": [1, 2.5, 3] })),
    ]
}

/// Values at and around the bounds the tasks check, of every JSON type.
fn candidates() -> Vec<Value> {
    let mut out = vec![
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(0.5),
        json!(1000),
        json!(1000.5),
        json!(1001),
        json!(86_400),
        json!(86_401),
        json!([]),
        json!({}),
        json!(""),
        json!(" "),
        json!("DE"),
        json!("de"),
        json!("D E"),
        json!("REF_1-a"),
        json!("ref/1"),
    ];
    for n in [1, 2, 64, 65, 100, 101, 200, 201] {
        out.push(Value::String("a".repeat(n)));
        out.push(Value::String(format!("  {}  ", "b".repeat(n))));
    }
    out
}

/// Every input one change away from `value`: each field (at any depth)
/// replaced by each candidate or removed, an unknown field added, each
/// array emptied or its first item repeated.
fn mutations(value: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    match value {
        Value::Object(map) => {
            let mut extra = map.clone();
            extra.insert("unexpected".into(), json!(1));
            out.push(Value::Object(extra));
            for (key, field) in map {
                let mut without = map.clone();
                without.remove(key);
                out.push(Value::Object(without));
                for replacement in candidates().into_iter().chain(mutations(field)) {
                    let mut changed = map.clone();
                    changed.insert(key.clone(), replacement);
                    out.push(Value::Object(changed));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            out.push(Value::Array([items.as_slice(), items].concat()));
            for changed in mutations(&items[0]) {
                let mut items = items.clone();
                items[0] = changed;
                out.push(Value::Array(items));
            }
        }
        _ => {}
    }
    out
}

fn task(name: &str) -> std::sync::Arc<dyn DynTask> {
    Registry::builtin()
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no task {name}"))
}

#[test]
fn every_builtin_task_has_an_example_here() {
    let covered: Vec<&str> = examples().iter().map(|(name, _)| *name).collect();
    let builtin: Vec<&str> = Registry::builtin().names().collect();
    assert_eq!(covered, builtin);
}

#[test]
fn no_schema_refuses_an_input_its_task_accepts() {
    for (name, example) in examples() {
        let task = task(name);
        let schema = task.input_schema();
        let validator = jsonschema::draft202012::new(&schema)
            .unwrap_or_else(|e| panic!("{name}: not a 2020-12 schema: {e}"));
        assert!(task.validate(&example).is_ok(), "{name}: bad example");
        let (mut accepted, mut refused_by_both) = (0, 0);
        for input in std::iter::once(example.clone()).chain(mutations(&example)) {
            let by_task = task.validate(&input).is_ok();
            let by_schema = validator.is_valid(&input);
            assert!(
                !by_task || by_schema,
                "{name}: the task accepts {input} but its schema {schema} refuses it"
            );
            accepted += usize::from(by_task);
            refused_by_both += usize::from(!by_task && !by_schema);
        }
        // The probes reach the refused side too, or they prove little.
        assert!(
            accepted > 0 && refused_by_both > 0,
            "{name}: probes too narrow"
        );
    }
}

#[test]
fn schemas_refuse_unknown_fields_and_wrong_types() {
    for (name, _) in examples() {
        let schema = task(name).input_schema();
        let validator = jsonschema::draft202012::new(&schema).expect("a valid schema");
        assert!(!validator.is_valid(&json!({"unexpected": 1})), "{name}");
        assert!(!validator.is_valid(&json!([1, 2])), "{name}");
        assert_eq!(
            schema.get("additionalProperties"),
            Some(&json!(false)),
            "{name}"
        );
        assert!(schema.get("$schema").is_none() && schema.get("title").is_none());
        assert!(
            !schema.to_string().contains("$ref"),
            "{name}: not self-contained"
        );
    }
}

#[test]
fn bounds_validate_checks_are_in_the_schema() {
    let shipments = task("labels.generate").input_schema();
    let shipment = &shipments["properties"]["shipments"];
    assert_eq!(shipment["minItems"], json!(1));
    assert_eq!(shipment["maxItems"], json!(crate::labels::MAX_SHIPMENTS));
    let weight = &shipment["items"]["properties"]["weight_kg"];
    assert_eq!(
        (&weight["exclusiveMinimum"], &weight["maximum"]),
        (&json!(0), &json!(1000.0))
    );
    let sleep = task("sleep").input_schema();
    assert_eq!(sleep["properties"]["seconds"]["maximum"], json!(86_400.0));
}
