//! User-defined event filters: a small JSON expression language, validated
//! and compiled once when a client sends it, then evaluated per event
//! against the compiled tree (field paths split, operands parsed to
//! decimals, sets hashed) without looking at the filter's JSON again.
//!
//! # Syntax
//!
//! A filter is a *node*. A node is an object that is either a comparison
//!
//! ```json
//! {"field": "amount", "op": "gte", "value": "100"}
//! ```
//!
//! or a combinator with exactly one key:
//!
//! ```json
//! {"all": [node, ...]}   every node matches (non-empty array)
//! {"any": [node, ...]}   at least one node matches (non-empty array)
//! {"not": node}          the node does not match
//! ```
//!
//! `field` is a dotted path into nested objects: `"asset.code"` reads
//! `event["asset"]["code"]`. Segments may not be empty (`"a..b"`, `".a"`);
//! a key that itself contains a dot cannot be addressed, and arrays are not
//! indexed (a path through an array resolves to nothing).
//!
//! # Semantics
//!
//! A field is *missing* when its path does not resolve or resolves to
//! `null`. A *decimal* is a JSON number, or a string that
//! [`parse_decimal`] accepts (`"-12"`, `"100.50"`, `"1e3"`; surrounding
//! whitespace ignored), compared exactly as a [`Decimal`] (so `"100.0"`
//! equals `100`; numbers beyond `Decimal`'s 28 significant digits are
//! rounded as the rest of the server rounds them, and numbers out of its
//! range are not decimals).
//!
//! | op | `value` | matches when the event field … |
//! |---|---|---|
//! | `eq` | number | is a decimal equal to the value |
//! | `eq` | string | is a string, exactly equal (no numeric reading: `"100"` does not equal `"100.0"` nor `100`) |
//! | `eq` | `true`, `false`, `null` | is that JSON value (`eq null` is the one test a `null` field passes) |
//! | `ne` | as `eq` | is **not missing** and `eq` does not match. A missing field does not match `ne`: write `{"not": {… "op": "eq" …}}` for "missing or different" |
//! | `gt` `gte` `lt` `lte` | number or decimal string | is a decimal and compares so; anything else (missing, non-decimal string, bool) never matches |
//! | `in` | non-empty array of strings, numbers, booleans, null (at most [`MAX_SET`]) | `eq` matches for at least one element |
//! | `prefix` | string | is a string starting with the value |
//! | `contains` | string | is a string containing the value |
//! | `exists` | optional boolean, default `true` | is not missing (`true`), or is missing (`false`) |
//!
//! # Validation
//!
//! [`Filter::compile`] rejects, with an error naming the path of the
//! offending part (e.g. ``field `filter.all[1].op`: unknown operator `gtx` …``):
//! a node that is not an object; an unknown key; a combinator beside other
//! keys; an empty or non-array `all`/`any`; a missing `field`, `op`, or (for
//! every op but `exists`) `value`; an empty path segment; an unknown
//! operator; a value of the wrong type for its operator (including a string
//! that is not a decimal for `gt`..`lte`, and numbers outside `Decimal`'s
//! range); an empty or too large `in` set; nesting deeper than
//! [`MAX_DEPTH`] nodes (the root is level 1); more than [`MAX_NODES`] nodes
//! in all (comparisons and combinators each count one).

use std::collections::HashSet;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::app::events::filter::parse_decimal;
use crate::app::protocol::{ErrorCode, ProtocolError};

/// Deepest nesting of nodes; the root is at level 1.
pub const MAX_DEPTH: usize = 8;
/// Most nodes (comparisons and combinators) in one filter.
pub const MAX_NODES: usize = 64;
/// Most elements in an `in` set.
pub const MAX_SET: usize = 256;

const OPERATORS: &str = "eq, ne, gt, gte, lt, lte, in, prefix, contains, exists";

/// A compiled filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    root: Node,
    nodes: usize,
    source: Value,
}

impl Filter {
    /// Validates `spec` and compiles it. `path` names `spec` in error
    /// messages (e.g. `"filter"`, giving paths like `filter.all[1].op`).
    pub fn compile(spec: &Value, path: &str) -> Result<Filter, ProtocolError> {
        let mut compiler = Compiler { nodes: 0 };
        let root = compiler.node(spec, path, 1)?;
        Ok(Filter {
            root,
            nodes: compiler.nodes,
            source: spec.clone(),
        })
    }

    /// Whether the event passes the filter.
    pub fn matches(&self, event: &Map<String, Value>) -> bool {
        self.root.matches(event)
    }

    /// The filter as the client sent it, for listings.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// How many nodes the filter has (at most [`MAX_NODES`]).
    pub fn node_count(&self) -> usize {
        self.nodes
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Test { field: FieldPath, test: Test },
}

impl Node {
    fn matches(&self, event: &Map<String, Value>) -> bool {
        match self {
            Node::All(nodes) => nodes.iter().all(|n| n.matches(event)),
            Node::Any(nodes) => nodes.iter().any(|n| n.matches(event)),
            Node::Not(node) => !node.matches(event),
            Node::Test { field, test } => test.matches(field.resolve(event)),
        }
    }
}

/// A dotted path, split once.
#[derive(Debug, Clone, PartialEq)]
struct FieldPath(Vec<String>);

impl FieldPath {
    fn parse(text: &str) -> Option<FieldPath> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return None;
        }
        Some(FieldPath(segments))
    }

    fn resolve<'a>(&self, event: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.0.split_first()?;
        let mut value = event.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Order {
    fn holds(self, field: Decimal, value: Decimal) -> bool {
        match self {
            Order::Gt => field > value,
            Order::Gte => field >= value,
            Order::Lt => field < value,
            Order::Lte => field <= value,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Eq(Operand),
    Ne(Operand),
    Order(Order, Decimal),
    In(Set),
    Prefix(String),
    Contains(String),
    Exists(bool),
}

impl Test {
    /// `field` is what the path resolved to, `null` included.
    fn matches(&self, field: Option<&Value>) -> bool {
        let present = field;
        let existing = field.filter(|v| !v.is_null());
        match self {
            Test::Eq(operand) => present.is_some_and(|v| operand.equals(v)),
            Test::Ne(operand) => existing.is_some_and(|v| !operand.equals(v)),
            Test::Order(order, value) => existing
                .and_then(decimal_of)
                .is_some_and(|d| order.holds(d, *value)),
            Test::In(set) => present.is_some_and(|v| set.contains(v)),
            Test::Prefix(prefix) => existing
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with(prefix.as_str())),
            Test::Contains(needle) => existing
                .and_then(Value::as_str)
                .is_some_and(|s| s.contains(needle.as_str())),
            Test::Exists(want) => existing.is_some() == *want,
        }
    }
}

/// An `eq`/`ne` operand, or one element of an `in` set.
#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Number(Decimal),
    String(String),
    /// `true`, `false` or `null`: compared by JSON equality.
    Literal(Value),
}

impl Operand {
    fn equals(&self, field: &Value) -> bool {
        match self {
            Operand::Number(n) => decimal_of(field) == Some(*n),
            Operand::String(s) => field.as_str() == Some(s.as_str()),
            Operand::Literal(literal) => field == literal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Set {
    numbers: HashSet<Decimal>,
    strings: HashSet<String>,
    literals: Vec<Value>,
}

impl Set {
    fn insert(&mut self, operand: Operand) {
        match operand {
            Operand::Number(n) => {
                self.numbers.insert(n);
            }
            Operand::String(s) => {
                self.strings.insert(s);
            }
            Operand::Literal(v) => {
                if !self.literals.contains(&v) {
                    self.literals.push(v);
                }
            }
        }
    }

    fn contains(&self, field: &Value) -> bool {
        match field {
            Value::String(s) => {
                self.strings.contains(s.as_str())
                    || (!self.numbers.is_empty()
                        && parse_decimal(s).is_some_and(|d| self.numbers.contains(&d)))
            }
            Value::Number(n) => {
                !self.numbers.is_empty()
                    && parse_decimal(n.as_str()).is_some_and(|d| self.numbers.contains(&d))
            }
            _ => self.literals.contains(field),
        }
    }
}

/// A JSON number, or a string holding a decimal.
fn decimal_of(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => parse_decimal(n.as_str()),
        Value::String(s) => parse_decimal(s),
        _ => None,
    }
}

struct Compiler {
    nodes: usize,
}

impl Compiler {
    fn node(&mut self, spec: &Value, path: &str, depth: usize) -> Result<Node, ProtocolError> {
        if depth > MAX_DEPTH {
            return Err(invalid(
                path,
                format!("filter nested too deep (at most {MAX_DEPTH} levels)"),
            ));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(invalid(
                path,
                format!("filter has too many nodes (at most {MAX_NODES})"),
            ));
        }
        let Value::Object(object) = spec else {
            return Err(invalid(
                path,
                "must be a filter node: an object with `field`, `op` and `value`, or with one of `all`, `any`, `not`",
            ));
        };
        let combinator = object
            .keys()
            .find(|k| matches!(k.as_str(), "all" | "any" | "not"));
        match combinator {
            Some(key) => self.combinator(object, key, path, depth),
            None => self.comparison(object, path),
        }
    }

    fn combinator(
        &mut self,
        object: &Map<String, Value>,
        key: &str,
        path: &str,
        depth: usize,
    ) -> Result<Node, ProtocolError> {
        if let Some(other) = object.keys().find(|k| *k != key) {
            return Err(invalid(
                &format!("{path}.{other}"),
                format!("unexpected key beside `{key}` (a combinator node has exactly one key)"),
            ));
        }
        let path = format!("{path}.{key}");
        let child = &object[key];
        if key == "not" {
            return Ok(Node::Not(Box::new(self.node(child, &path, depth + 1)?)));
        }
        let items = match child {
            Value::Array(items) if !items.is_empty() => items,
            _ => return Err(invalid(&path, "must be a non-empty array of filter nodes")),
        };
        let nodes = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.node(item, &format!("{path}[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if key == "all" {
            Node::All(nodes)
        } else {
            Node::Any(nodes)
        })
    }

    fn comparison(
        &mut self,
        object: &Map<String, Value>,
        path: &str,
    ) -> Result<Node, ProtocolError> {
        if let Some(key) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "field" | "op" | "value"))
        {
            return Err(invalid(
                &format!("{path}.{key}"),
                format!("unknown key `{key}` (a filter node has `field`, `op` and `value`, or one of `all`, `any`, `not`)"),
            ));
        }
        let field_path = format!("{path}.field");
        let field = match object.get("field") {
            None => return Err(missing(&field_path)),
            Some(Value::String(text)) => FieldPath::parse(text).ok_or_else(|| {
                invalid(
                    &field_path,
                    format!("bad field path `{text}`: empty segment (write a dotted path like \"asset.code\")"),
                )
            })?,
            Some(_) => {
                return Err(invalid(
                    &field_path,
                    "must be a string: a dotted field path like \"asset.code\"",
                ))
            }
        };
        let op_path = format!("{path}.op");
        let op = match object.get("op") {
            None => return Err(missing(&op_path)),
            Some(Value::String(op)) => op.as_str(),
            Some(_) => {
                return Err(invalid(
                    &op_path,
                    format!("must be a string, one of {OPERATORS}"),
                ))
            }
        };
        let value_path = format!("{path}.value");
        let value = object.get("value");
        let required = || value.ok_or_else(|| missing(&value_path));
        let test = match op {
            "eq" => Test::Eq(operand(required()?, &value_path, op)?),
            "ne" => Test::Ne(operand(required()?, &value_path, op)?),
            "gt" => Test::Order(Order::Gt, ordered(required()?, &value_path, op)?),
            "gte" => Test::Order(Order::Gte, ordered(required()?, &value_path, op)?),
            "lt" => Test::Order(Order::Lt, ordered(required()?, &value_path, op)?),
            "lte" => Test::Order(Order::Lte, ordered(required()?, &value_path, op)?),
            "in" => Test::In(set(required()?, &value_path)?),
            "prefix" => Test::Prefix(string(required()?, &value_path, op)?),
            "contains" => Test::Contains(string(required()?, &value_path, op)?),
            "exists" => Test::Exists(match value {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(invalid(
                        &value_path,
                        "must be a boolean for op `exists` (or left out: true)",
                    ))
                }
            }),
            other => {
                return Err(invalid(
                    &op_path,
                    format!("unknown operator `{other}` (expected {OPERATORS})"),
                ))
            }
        };
        Ok(Node::Test { field, test })
    }
}

/// A JSON number as a decimal, or an error naming `path`.
fn number(n: &serde_json::Number, path: &str) -> Result<Decimal, ProtocolError> {
    parse_decimal(n.as_str())
        .ok_or_else(|| invalid(path, format!("number {n} is out of range for a decimal")))
}

fn operand(value: &Value, path: &str, op: &str) -> Result<Operand, ProtocolError> {
    match value {
        Value::Number(n) => Ok(Operand::Number(number(n, path)?)),
        Value::String(s) => Ok(Operand::String(s.clone())),
        Value::Bool(_) | Value::Null => Ok(Operand::Literal(value.clone())),
        Value::Array(_) | Value::Object(_) => Err(invalid(
            path,
            format!("must be a string, number, boolean or null for op `{op}`"),
        )),
    }
}

fn ordered(value: &Value, path: &str, op: &str) -> Result<Decimal, ProtocolError> {
    match value {
        Value::Number(n) => number(n, path),
        Value::String(s) => parse_decimal(s).ok_or_else(|| {
            invalid(
                path,
                format!("`{s}` is not a decimal (op `{op}` needs a number or a decimal string like \"100.5\")"),
            )
        }),
        _ => Err(invalid(
            path,
            format!("must be a number or a decimal string for op `{op}`"),
        )),
    }
}

fn set(value: &Value, path: &str) -> Result<Set, ProtocolError> {
    let Value::Array(items) = value else {
        return Err(invalid(
            path,
            "must be an array of strings, numbers, booleans or null for op `in`",
        ));
    };
    if items.is_empty() {
        return Err(invalid(path, "must be a non-empty array for op `in`"));
    }
    if items.len() > MAX_SET {
        return Err(invalid(
            path,
            format!(
                "set too large: {} elements (at most {MAX_SET})",
                items.len()
            ),
        ));
    }
    let mut set = Set::default();
    for (i, item) in items.iter().enumerate() {
        set.insert(operand(item, &format!("{path}[{i}]"), "in")?);
    }
    Ok(set)
}

fn string(value: &Value, path: &str, op: &str) -> Result<String, ProtocolError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        _ => Err(invalid(path, format!("must be a string for op `{op}`"))),
    }
}

fn invalid(path: &str, problem: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidField,
        format!("field `{path}`: {problem}"),
    )
}

fn missing(path: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::MissingField,
        format!("field `{path}` is required"),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn compile(spec: Value) -> Filter {
        Filter::compile(&spec, "filter").unwrap_or_else(|e| panic!("{spec}: {}", e.message))
    }

    fn error(spec: Value) -> ProtocolError {
        Filter::compile(&spec, "filter").expect_err(&spec.to_string())
    }

    fn event(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    /// Parses like a received message, so numbers keep their exact text.
    fn event_text(text: &str) -> Map<String, Value> {
        event(serde_json::from_str(text).unwrap())
    }

    fn leaf(field: &str, op: &str, value: Value) -> Value {
        json!({ "field": field, "op": op, "value": value })
    }

    fn check(filter: &Value, event_json: &str) -> bool {
        compile(filter.clone()).matches(&event_text(event_json))
    }

    #[test]
    fn ordered_ops_compare_numbers_and_decimal_strings_exactly() {
        let gte = leaf("amount", "gte", json!("100"));
        assert!(check(&gte, r#"{"amount":"100"}"#));
        assert!(check(&gte, r#"{"amount":"100.000"}"#));
        assert!(check(&gte, r#"{"amount":100}"#));
        assert!(check(&gte, r#"{"amount":1e2}"#));
        assert!(check(&gte, r#"{"amount":"250.5"}"#));
        assert!(!check(&gte, r#"{"amount":"99.9999999999999999999999"}"#));
        assert!(!check(&gte, r#"{"amount":99.99999999999999999}"#));
        // Not decimals: never match, whatever the op.
        for e in [
            r#"{}"#,
            r#"{"amount":null}"#,
            r#"{"amount":"lots"}"#,
            r#"{"amount":true}"#,
            r#"{"amount":[100]}"#,
        ] {
            assert!(!check(&gte, e), "{e}");
            assert!(!check(&leaf("amount", "lt", json!(100)), e), "{e}");
        }
        let gt = leaf("amount", "gt", json!(0.1));
        assert!(!check(&gt, r#"{"amount":"0.1"}"#));
        assert!(check(&gt, r#"{"amount":"0.10000000000000000001"}"#));
        let lt = leaf("amount", "lt", json!("-5"));
        assert!(check(&lt, r#"{"amount":-5.5}"#));
        assert!(!check(&lt, r#"{"amount":"-5"}"#));
        let lte = leaf("amount", "lte", json!("-5"));
        assert!(check(&lte, r#"{"amount":"-5.0"}"#));
        assert!(!check(&lte, r#"{"amount":"-4.9"}"#));
    }

    #[test]
    fn eq_with_a_number_compares_numerically_with_a_string_exactly() {
        let num = leaf("amount", "eq", json!(100));
        assert!(check(&num, r#"{"amount":"100.0"}"#));
        assert!(check(&num, r#"{"amount":100.00}"#));
        assert!(check(&num, r#"{"amount":"1e2"}"#));
        assert!(!check(&num, r#"{"amount":"100.01"}"#));
        assert!(!check(&num, r#"{"amount":"hundred"}"#));
        assert!(!check(&num, r#"{}"#));
        let text = leaf("amount", "eq", json!("100"));
        assert!(check(&text, r#"{"amount":"100"}"#));
        assert!(!check(&text, r#"{"amount":"100.0"}"#));
        assert!(!check(&text, r#"{"amount":100}"#));
        let exact = Filter::compile(
            &serde_json::from_str(r#"{"field":"x","op":"eq","value":0.30000000000000000001}"#)
                .unwrap(),
            "filter",
        )
        .unwrap();
        assert!(exact.matches(&event_text(r#"{"x":"0.30000000000000000001"}"#)));
        assert!(!exact.matches(&event_text(r#"{"x":0.3}"#)));
    }

    #[test]
    fn eq_with_bool_and_null_is_json_equality() {
        let t = leaf("ok", "eq", json!(true));
        assert!(check(&t, r#"{"ok":true}"#));
        assert!(!check(&t, r#"{"ok":"true"}"#));
        assert!(!check(&t, r#"{"ok":1}"#));
        let null = leaf("memo", "eq", Value::Null);
        assert!(check(&null, r#"{"memo":null}"#));
        assert!(!check(&null, r#"{}"#));
        assert!(!check(&null, r#"{"memo":""}"#));
    }

    #[test]
    fn ne_needs_the_field_and_not_eq_does_not() {
        let ne = leaf("type", "ne", json!("payment"));
        assert!(check(&ne, r#"{"type":"trade"}"#));
        assert!(check(&ne, r#"{"type":5}"#));
        assert!(!check(&ne, r#"{"type":"payment"}"#));
        assert!(!check(&ne, r#"{}"#));
        assert!(!check(&ne, r#"{"type":null}"#));
        let not_eq = json!({"not": leaf("type", "eq", json!("payment"))});
        assert!(check(&not_eq, r#"{}"#));
        assert!(check(&not_eq, r#"{"type":"trade"}"#));
        assert!(!check(&not_eq, r#"{"type":"payment"}"#));
        let ne_num = leaf("amount", "ne", json!(100));
        assert!(!check(&ne_num, r#"{"amount":"100.00"}"#));
        assert!(check(&ne_num, r#"{"amount":"100.01"}"#));
        assert!(check(&leaf("memo", "ne", Value::Null), r#"{"memo":"x"}"#));
        assert!(!check(&leaf("memo", "ne", Value::Null), r#"{"memo":null}"#));
    }

    #[test]
    fn in_is_eq_against_any_element() {
        let f = leaf("code", "in", json!(["USDC", "EURC", 7, true, null]));
        assert!(check(&f, r#"{"code":"USDC"}"#));
        assert!(check(&f, r#"{"code":"EURC"}"#));
        assert!(!check(&f, r#"{"code":"usdc"}"#));
        assert!(check(&f, r#"{"code":7}"#));
        assert!(check(&f, r#"{"code":"7.0"}"#));
        assert!(check(&f, r#"{"code":true}"#));
        assert!(check(&f, r#"{"code":null}"#));
        assert!(!check(&f, r#"{"code":false}"#));
        assert!(!check(&f, r#"{}"#));
        assert!(!check(&f, r#"{"code":{"x":1}}"#));
        let strings = leaf("code", "in", json!(["1"]));
        assert!(!check(&strings, r#"{"code":1}"#));
        assert!(!check(&strings, r#"{"code":"1.0"}"#));
        let full: Vec<Value> = (0..MAX_SET).map(|i| json!(i.to_string())).collect();
        let big = leaf("code", "in", Value::Array(full));
        assert!(check(&big, r#"{"code":"255"}"#));
        assert!(!check(&big, r#"{"code":"256"}"#));
    }

    #[test]
    fn prefix_contains_and_exists() {
        let p = leaf("account", "prefix", json!("GA"));
        assert!(check(&p, r#"{"account":"GABC"}"#));
        assert!(!check(&p, r#"{"account":"XGA"}"#));
        assert!(!check(&p, r#"{"account":12}"#));
        assert!(!check(&p, r#"{}"#));
        let c = leaf("memo", "contains", json!("refund"));
        assert!(check(&c, r#"{"memo":"partial refund #3"}"#));
        assert!(!check(&c, r#"{"memo":"Refund"}"#));
        assert!(!check(&c, r#"{"memo":["refund"]}"#));
        let exists = json!({"field": "memo", "op": "exists"});
        assert!(check(&exists, r#"{"memo":""}"#));
        assert!(check(&exists, r#"{"memo":false}"#));
        assert!(!check(&exists, r#"{"memo":null}"#));
        assert!(!check(&exists, r#"{}"#));
        let absent = leaf("memo", "exists", json!(false));
        assert!(check(&absent, r#"{}"#));
        assert!(check(&absent, r#"{"memo":null}"#));
        assert!(!check(&absent, r#"{"memo":0}"#));
    }

    #[test]
    fn dotted_paths_reach_into_nested_objects() {
        let f = leaf("asset.code", "eq", json!("USDC"));
        assert!(check(&f, r#"{"asset":{"code":"USDC","issuer":"G1"}}"#));
        assert!(!check(&f, r#"{"asset":"USDC"}"#));
        assert!(!check(&f, r#"{"asset.code":"USDC"}"#));
        assert!(!check(&f, r#"{"asset":[{"code":"USDC"}]}"#));
        let deep = leaf("a.b.c.d", "gt", json!(1));
        assert!(check(&deep, r#"{"a":{"b":{"c":{"d":"1.5"}}}}"#));
        assert!(!check(&deep, r#"{"a":{"b":{"c":null}}}"#));
    }

    #[test]
    fn combinators() {
        let f = json!({"all": [
            leaf("type", "in", json!(["payment", "trade"])),
            {"any": [
                leaf("amount", "gte", json!("1000")),
                leaf("asset.code", "eq", json!("BTC")),
            ]},
            {"not": leaf("from", "prefix", json!("GBAD"))},
        ]});
        let filter = compile(f);
        let yes = [
            r#"{"type":"payment","amount":"1000","from":"GOOD"}"#,
            r#"{"type":"trade","amount":"1","asset":{"code":"BTC"}}"#,
        ];
        let no = [
            r#"{"type":"payment","amount":"999.99","from":"GOOD"}"#,
            r#"{"type":"contract_event","amount":"5000"}"#,
            r#"{"type":"payment","amount":5000,"from":"GBADX"}"#,
        ];
        for e in yes {
            assert!(filter.matches(&event_text(e)), "{e}");
        }
        for e in no {
            assert!(!filter.matches(&event_text(e)), "{e}");
        }
        assert_eq!(filter.node_count(), 7);
        assert_eq!(filter.source()["all"][0]["op"], "in");
        let nn = json!({"not": {"not": leaf("x", "exists", json!(true))}});
        assert!(check(&nn, r#"{"x":1}"#));
        assert!(!check(&nn, r#"{}"#));
    }

    fn assert_error(spec: Value, code: ErrorCode, message: &str) {
        let e = error(spec.clone());
        assert_eq!(e.code, code, "{spec}: {}", e.message);
        assert!(
            e.message.contains(message),
            "{spec}: `{}` lacks `{message}`",
            e.message
        );
    }

    #[test]
    fn errors_name_the_path() {
        use ErrorCode::{InvalidField, MissingField};
        assert_error(
            json!({"all": [leaf("a", "eq", json!(1)), leaf("a", "gtx", json!(1))]}),
            InvalidField,
            "field `filter.all[1].op`: unknown operator `gtx` (expected eq, ne, gt, gte, lt, lte, in, prefix, contains, exists)",
        );
        assert_error(
            json!({"field": "a", "op": "eq", "value": 1, "extra": 2}),
            InvalidField,
            "field `filter.extra`: unknown key `extra`",
        );
        assert_error(
            json!({"alll": []}),
            InvalidField,
            "field `filter.alll`: unknown key",
        );
        assert_error(
            json!({"all": [leaf("a", "eq", json!(1))], "any": []}),
            InvalidField,
            "field `filter.any`: unexpected key beside `all`",
        );
        assert_error(
            json!({"field": "a", "not": {}}),
            InvalidField,
            "field `filter.field`: unexpected key beside `not`",
        );
        assert_error(
            json!({"all": []}),
            InvalidField,
            "field `filter.all`: must be a non-empty array",
        );
        assert_error(
            json!({"any": {}}),
            InvalidField,
            "field `filter.any`: must be a non-empty array",
        );
        assert_error(
            json!({"not": [leaf("a", "eq", json!(1))]}),
            InvalidField,
            "field `filter.not`: must be a filter node",
        );
        assert_error(
            json!("amount > 5"),
            InvalidField,
            "field `filter`: must be a filter node",
        );
        assert_error(
            json!({"any": [leaf("a", "eq", json!(1)), 3]}),
            InvalidField,
            "field `filter.any[1]`: must be a filter node",
        );
        assert_error(json!({}), MissingField, "field `filter.field` is required");
        assert_error(
            json!({"field": "a"}),
            MissingField,
            "field `filter.op` is required",
        );
        assert_error(
            json!({"field": "a", "op": "gt"}),
            MissingField,
            "field `filter.value` is required",
        );
        assert_error(
            json!({"not": {"field": "a", "op": "in"}}),
            MissingField,
            "field `filter.not.value` is required",
        );
        assert_error(
            json!({"field": 5, "op": "eq", "value": 1}),
            InvalidField,
            "field `filter.field`: must be a string",
        );
        assert_error(
            leaf("a..b", "eq", json!(1)),
            InvalidField,
            "field `filter.field`: bad field path `a..b`: empty segment",
        );
        assert_error(leaf("", "eq", json!(1)), InvalidField, "bad field path ``");
        assert_error(
            leaf("a.", "eq", json!(1)),
            InvalidField,
            "bad field path `a.`",
        );
        assert_error(
            json!({"field": "a", "op": 1, "value": 1}),
            InvalidField,
            "field `filter.op`: must be a string",
        );
        assert_error(
            leaf("a", "gt", json!("abc")),
            InvalidField,
            "field `filter.value`: `abc` is not a decimal",
        );
        assert_error(
            leaf("a", "lte", json!(true)),
            InvalidField,
            "field `filter.value`: must be a number or a decimal string for op `lte`",
        );
        assert_error(
            leaf("a", "gte", Value::Null),
            InvalidField,
            "must be a number or a decimal string for op `gte`",
        );
        assert_error(
            leaf("a", "eq", json!([1])),
            InvalidField,
            "field `filter.value`: must be a string, number, boolean or null for op `eq`",
        );
        assert_error(leaf("a", "ne", json!({})), InvalidField, "for op `ne`");
        assert_error(
            leaf("a", "in", json!("USDC")),
            InvalidField,
            "field `filter.value`: must be an array",
        );
        assert_error(
            leaf("a", "in", json!([])),
            InvalidField,
            "field `filter.value`: must be a non-empty array",
        );
        assert_error(
            leaf("a", "in", json!(["x", ["y"]])),
            InvalidField,
            "field `filter.value[1]`: must be a string, number, boolean or null for op `in`",
        );
        assert_error(
            leaf("a", "prefix", json!(1)),
            InvalidField,
            "field `filter.value`: must be a string for op `prefix`",
        );
        assert_error(
            leaf("a", "contains", Value::Null),
            InvalidField,
            "must be a string for op `contains`",
        );
        assert_error(
            leaf("a", "exists", json!("yes")),
            InvalidField,
            "field `filter.value`: must be a boolean for op `exists`",
        );
        let huge: Value = serde_json::from_str(r#"{"field":"a","op":"gt","value":1e400}"#).unwrap();
        assert_error(
            huge,
            InvalidField,
            "field `filter.value`: number 1e+400 is out of range",
        );
        let huge_in: Value =
            serde_json::from_str(r#"{"field":"a","op":"in","value":[1,-1e99]}"#).unwrap();
        assert_error(
            huge_in,
            InvalidField,
            "field `filter.value[1]`: number -1e+99 is out of range",
        );
        let e = Filter::compile(
            &json!({"field": "a", "op": "x", "value": 1}),
            "alert.filter",
        )
        .unwrap_err();
        assert!(
            e.message.starts_with("field `alert.filter.op`:"),
            "{}",
            e.message
        );
    }

    #[test]
    fn set_size_is_limited() {
        let items: Vec<Value> = (0..=MAX_SET).map(|i| json!(i)).collect();
        assert_error(
            leaf("a", "in", Value::Array(items)),
            ErrorCode::InvalidField,
            "field `filter.value`: set too large: 257 elements (at most 256)",
        );
    }

    fn nested_not(levels: usize) -> Value {
        let mut node = leaf("a", "exists", json!(true));
        for _ in 1..levels {
            node = json!({ "not": node });
        }
        node
    }

    #[test]
    fn nesting_depth_is_limited() {
        let ok = compile(nested_not(MAX_DEPTH));
        assert_eq!(ok.node_count(), MAX_DEPTH);
        // 7 `not`s around the leaf: an odd count negates it.
        assert!(!ok.matches(&event_text(r#"{"a":1}"#)));
        let e = error(nested_not(MAX_DEPTH + 1));
        assert_eq!(e.code, ErrorCode::InvalidField);
        let deepest = format!("filter{}", ".not".repeat(MAX_DEPTH));
        assert_eq!(
            e.message,
            format!("field `{deepest}`: filter nested too deep (at most 8 levels)")
        );
        // Far deeper than the limit: rejected without recursing through it all.
        assert!(error(nested_not(120)).message.contains("too deep"));
        let in_all = json!({"all": [{"any": [nested_not(MAX_DEPTH - 1)]}]});
        assert!(error(in_all)
            .message
            .starts_with("field `filter.all[0].any[0].not.not.not.not.not.not`"));
    }

    #[test]
    fn node_count_is_limited() {
        let leaves = |n: usize| -> Value {
            Value::Array((0..n).map(|i| leaf("a", "eq", json!(i))).collect())
        };
        let ok = compile(json!({ "any": leaves(MAX_NODES - 1) }));
        assert_eq!(ok.node_count(), MAX_NODES);
        assert!(ok.matches(&event_text(r#"{"a":"62"}"#)));
        let e = error(json!({ "any": leaves(MAX_NODES) }));
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert_eq!(
            e.message,
            "field `filter.any[63]`: filter has too many nodes (at most 64)"
        );
        // Combinators count too.
        let wrapped: Vec<Value> = (0..32)
            .map(|i| json!({"not": leaf("a", "eq", json!(i))}))
            .collect();
        assert!(error(json!({ "all": wrapped }))
            .message
            .contains("too many nodes"));
    }
}
