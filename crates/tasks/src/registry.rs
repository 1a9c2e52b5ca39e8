//! The one list of tasks, and the type-erased view api and worker use.

use crate::{Input, Policy, Task, TaskContext, TaskError, ValidationErrors};
use serde_json::{Map, Value};
use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

/// The future of one type-erased run: the output as JSON.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// A [`Task`] seen through JSON, so tasks of different types can live in one
/// registry. Implemented for every `Task`, and by [`crate::ExternalTask`]
/// for types whose code runs elsewhere.
pub trait DynTask: Send + Sync {
    fn name(&self) -> &str;
    fn policy(&self) -> Policy;
    /// Field names Celery's positional arguments fill, in order. The first
    /// is also where a workflow step receives the previous step's result
    /// unless it says otherwise.
    fn positional(&self) -> &[&'static str];
    /// Checks an input without running anything (the API's 422 path).
    fn validate(&self, input: &Value) -> Result<(), ValidationErrors>;
    /// The input as a JSON Schema: what `validate` requires, as far as a
    /// schema can say it (checksums and cross-field rules stay in
    /// `validate`). Never stricter than `validate`.
    fn input_schema(&self) -> Value;
    /// Builds the input object from a Celery call's positional `args` and
    /// `kwargs`, using the task's declared positional names.
    fn input_from_call(
        &self,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, ValidationErrors>;
    /// Parses and validates `input`, runs the task, serialises its output.
    fn run(&self, input: Value, ctx: TaskContext) -> TaskFuture;
}

struct Erased<T>(Arc<T>);

impl<T: Task> DynTask for Erased<T> {
    fn name(&self) -> &str {
        T::NAME
    }

    fn policy(&self) -> Policy {
        self.0.policy()
    }

    fn positional(&self) -> &[&'static str] {
        T::POSITIONAL
    }

    fn validate(&self, input: &Value) -> Result<(), ValidationErrors> {
        T::Input::parse(input).map(drop)
    }

    fn input_schema(&self) -> Value {
        T::Input::schema()
    }

    fn input_from_call(
        &self,
        args: Vec<Value>,
        mut kwargs: Map<String, Value>,
    ) -> Result<Value, ValidationErrors> {
        let names = T::POSITIONAL;
        if args.len() > names.len() {
            return Err(ValidationErrors::single(
                "",
                "too_many_arguments",
                format!(
                    "{} takes at most {} positional argument(s) ({}), got {}; pass keyword arguments instead",
                    T::NAME,
                    names.len(),
                    names.join(", "),
                    args.len()
                ),
            ));
        }
        for (name, value) in names.iter().zip(args) {
            if kwargs.insert((*name).to_owned(), value).is_some() {
                return Err(ValidationErrors::single(
                    *name,
                    "duplicate_argument",
                    format!("`{name}` given both positionally and by keyword"),
                ));
            }
        }
        Ok(Value::Object(kwargs))
    }

    fn run(&self, input: Value, ctx: TaskContext) -> TaskFuture {
        let task = Arc::clone(&self.0);
        Box::pin(async move {
            let input = T::Input::parse(&input)?;
            let output = task.run(input, ctx).await?;
            serde_json::to_value(output).map_err(|e| {
                TaskError::Permanent(format!("{}: output could not be serialised: {e}", T::NAME))
            })
        })
    }
}

/// Task types by name. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<dyn DynTask>>,
}

impl Registry {
    /// Every task Warren ships. The one list: adding a task means adding a
    /// file and a line here.
    pub fn builtin() -> Self {
        Self::default()
            .with(crate::beneficiaries::CreateBeneficiary)
            .with(crate::beneficiaries::ImportBeneficiaries)
            .with(crate::labels::GenerateLabels)
            .with(crate::echo::Echo)
            .with(crate::multiply::Multiply)
            .with(crate::sum::Sum)
            .with(crate::noop::Noop)
            .with(crate::sleep::Sleep)
            .with(crate::flaky::Flaky)
    }

    /// Adds a task. Two tasks with one name would make routing ambiguous,
    /// so that is a programming error caught at startup.
    pub fn with<T: Task>(mut self, task: T) -> Self {
        let previous = self.tasks.insert(T::NAME, Arc::new(Erased(Arc::new(task))));
        assert!(previous.is_none(), "task `{}` registered twice", T::NAME);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn DynTask>> {
        self.tasks.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.tasks.keys().copied()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry() -> Registry {
        Registry::builtin()
    }

    #[test]
    fn builtin_tasks_are_registered() {
        let names: Vec<_> = registry().names().collect();
        assert_eq!(
            names,
            vec![
                "beneficiaries.create",
                "beneficiaries.import",
                "echo",
                "flaky",
                "labels.generate",
                "multiply",
                "noop",
                "sleep",
                "sum"
            ]
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let multiply = registry().get("multiply").cloned().unwrap();
        let err = multiply.validate(&json!({"x": "a", "y": 2})).unwrap_err();
        assert_eq!(err.errors().len(), 1);
        assert_eq!(err.errors()[0].field, "x");
        assert_eq!(err.errors()[0].code, "invalid_type");
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let multiply = registry().get("multiply").cloned().unwrap();
        let err = multiply.validate(&json!({"x": 1})).unwrap_err();
        assert_eq!(
            (err.errors()[0].field.as_str(), err.errors()[0].code),
            ("y", "missing_field")
        );
        let err = multiply
            .validate(&json!({"x": 1, "y": 2, "z": 3}))
            .unwrap_err();
        assert_eq!(
            (err.errors()[0].field.as_str(), err.errors()[0].code),
            ("z", "unknown_field")
        );
    }

    #[test]
    fn positional_arguments_fill_declared_names() {
        let multiply = registry().get("multiply").cloned().unwrap();
        let input = multiply
            .input_from_call(vec![json!(6), json!(7)], Map::new())
            .unwrap();
        assert_eq!(input, json!({"x": 6, "y": 7}));

        let err = multiply
            .input_from_call(vec![json!(1), json!(2), json!(3)], Map::new())
            .unwrap_err();
        assert_eq!(err.errors()[0].code, "too_many_arguments");

        let mut kwargs = Map::new();
        kwargs.insert("x".into(), json!(1));
        let err = multiply
            .input_from_call(vec![json!(6)], kwargs)
            .unwrap_err();
        assert_eq!(err.errors()[0].field, "x");
    }

    #[tokio::test]
    async fn run_parses_input_and_serialises_output() {
        let multiply = registry().get("multiply").cloned().unwrap();
        let ctx = TaskContext::detached(uuid::Uuid::nil(), 1);
        let out = multiply
            .run(json!({"x": 6, "y": 7}), ctx.clone())
            .await
            .unwrap();
        assert_eq!(out, json!(42));
        let err = multiply.run(json!({"x": "six"}), ctx).await.unwrap_err();
        assert!(matches!(err, TaskError::InvalidInput(_)), "{err:?}");
    }
}
