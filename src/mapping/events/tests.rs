//! Operations from messages and outbox rows: what each JSON shape becomes,
//! one sentence for each refusal, and properties over arbitrary input.

use proptest::prelude::*;

use super::*;
use crate::config::Config;
use crate::mapping::tests::{demo_catalog, DEMO_MAPPING};
use crate::mapping::{compile_config, Mapping, TableInfo};

const EVENTS: &str = r#"
[[messages]]
prefix = "app"
labels = ["User", "Event"]
types = ["ABOUT"]
keys = { Event = ["uid"] }

[[outbox]]
table = "public.outbox"
column = "payload"
type_column = "aggregatetype"
aggregate_column = "aggregateid"
labels = ["User", "Invoice"]
types = []
"#;

fn catalog() -> Catalog {
    let mut c = demo_catalog();
    if let Some(u) = c.get_mut("public.users") {
        u.types = vec![
            crate::decode::value::oid::INT4,
            crate::decode::value::oid::TEXT,
            crate::decode::value::oid::TEXT,
            crate::decode::value::oid::TIMESTAMPTZ,
        ];
    }
    c.insert(
        "public.outbox".into(),
        TableInfo {
            columns: ["id", "aggregatetype", "aggregateid", "payload"]
                .map(String::from)
                .to_vec(),
            primary_key: vec!["id".into()],
            unique: vec![vec!["id".into()]],
            replica_identity: 'd',
            oid: 4242,
            ..TableInfo::default()
        },
    );
    c
}

fn mapping_with(extra: &str) -> Result<Mapping, MappingError> {
    let cfg = Config::parse(&format!("{DEMO_MAPPING}{extra}")).expect("parses");
    compile_config(&cfg, &catalog())
}

fn rules() -> Rules {
    mapping_with(EVENTS).expect("compiles").messages["app"].clone()
}

fn refused(json: &str) -> String {
    parse_operations(json, &rules(), Lsn::new(9))
        .expect_err("refused")
        .0
}

#[test]
fn each_operation_becomes_its_graph_operation() {
    let m = mapping_with(EVENTS).expect("compiles");
    assert!(m.published_tables().contains(&"public.outbox".to_string()));
    assert_eq!(m.oids.get(&4242).map(String::as_str), Some("public.outbox"));
    assert!(m
        .node_keys()
        .contains(&(Arc::from("Event"), vec![Arc::from("uid")])));
    assert!(m
        .node_keys()
        .contains(&(Arc::from("Invoice"), vec![Arc::from("id")])));
    let ops = parse_operations(
        r#"[{"op": "merge_node", "label": "Event", "key": {"uid": "e1"}, "properties": {"n": 2, "tags": ["a", "b"], "gone": null}},
            {"op": "merge_relationship", "type": "ABOUT", "from": {"label": "Event", "key": {"uid": "e1"}},
             "to": {"label": "User", "key": {"id": 7}}, "properties": {"w": 0.5}},
            {"op": "delete_relationship", "type": "ABOUT", "from": {"label": "Event", "key": {"uid": "e1"}},
             "to": {"label": "User", "key": {"id": 7}}},
            {"op": "delete_node", "label": "User", "key": {"id": 7}}]"#,
        &m.messages["app"],
        Lsn::new(9),
    )
    .expect("applies");
    let event = NodeRef {
        label: Arc::from("Event"),
        key: Key(vec![Value::Text("e1".into())]),
    };
    let user = NodeRef {
        label: Arc::from("User"),
        key: Key(vec![Value::Int(7)]),
    };
    assert_eq!(
        ops,
        vec![
            GraphOp::UpsertNode {
                node: event.clone(),
                props: vec![
                    (Arc::from("gone"), Value::Null),
                    (Arc::from("n"), Value::Int(2)),
                    (
                        Arc::from("tags"),
                        Value::Array(vec![Value::Text("a".into()), Value::Text("b".into())])
                    ),
                ],
                lsn: Lsn::new(9),
                source: None,
            },
            GraphOp::MergeEdge {
                rel_type: Arc::from("ABOUT"),
                key: Key(Vec::new()),
                from: event.clone(),
                to: user.clone(),
                props: vec![(Arc::from("w"), Value::Float(0.5))],
                lsn: Lsn::new(9),
            },
            GraphOp::DeleteEdge {
                rel_type: Arc::from("ABOUT"),
                key: Key(Vec::new()),
                ends: Some((event, user.clone())),
                lsn: Lsn::new(9),
            },
            GraphOp::DeleteNode {
                node: user,
                lsn: Lsn::new(9)
            },
        ]
    );
}

#[test]
fn a_bad_operation_gets_one_sentence() {
    for (json, want) in [
        ("{", "it is not JSON"),
        ("7", "an operation must be a JSON object"),
        (r#"{"label": "Event"}"#, "lacks `op`"),
        (
            r#"{"op": "create_node"}"#,
            "`create_node` is not an operation",
        ),
        (
            r#"{"op": "merge_node", "label": "Secret", "key": {"id": 1}}"#,
            "the label `Secret` is not among the labels the [[messages]] prefix app section allows",
        ),
        (
            r#"{"op": "merge_node", "label": "Event", "key": {"id": 1}}"#,
            "the key of Event is (uid), but a merge_node gives `id`",
        ),
        (
            r#"{"op": "merge_node", "label": "User", "key": {"id": "7"}}"#,
            "the key `id` of User must be a JSON integer",
        ),
        (
            r#"{"op": "merge_node", "label": "User", "key": {"id": 7}, "properties": {"a": {"b": 1}}}"#,
            "is a JSON object, which Neo4j cannot store",
        ),
        (
            r#"{"op": "merge_node", "label": "User", "key": {"id": 7}, "properties": {"_lsn": 1}}"#,
            "the property name `_lsn` is not allowed",
        ),
        (
            r#"{"op": "merge_node", "label": "User", "key": {"id": 7}, "properties": {"id": 8}}"#,
            "`id` is a key property",
        ),
        (
            r#"{"op": "merge_node", "label": "User", "key": {"id": 7}, "cypher": "MATCH (n) DETACH DELETE n"}"#,
            "has the field `cypher`, which it does not take",
        ),
        (
            r#"{"op": "merge_relationship", "type": "OWNS", "from": {"label": "User", "key": {"id": 1}}, "to": {"label": "User", "key": {"id": 2}}}"#,
            "the relationship type `OWNS` is not among the types",
        ),
        (
            r#"{"op": "delete_relationship", "type": "ABOUT", "from": {"label": "User", "key": {"id": 1}}}"#,
            "lacks `to`",
        ),
        (
            r#"[{"op": "delete_node", "label": "User", "key": {"id": 1}}, {"op": "delete_node", "label": "Nope", "key": {"id": 1}}]"#,
            "item 1 of the list: the label `Nope`",
        ),
    ] {
        let got = refused(json);
        assert!(got.contains(want), "{json}: {got}");
    }
}

#[test]
fn a_bad_section_gets_one_sentence() {
    for (extra, want) in [
        (
            "[[messages]]\nprefix = \"app\"\n",
            "allows no labels and no types",
        ),
        (
            "[[messages]]\nprefix = \"app\"\ntypes = [\"PLACED_BY\"]\n",
            "which a [[relationship]] maps from a table",
        ),
        (
            "[[messages]]\nprefix = \"app\"\nlabels = [\"User\"]\nkeys = { User = [\"name\"] }\n",
            "which public.users maps",
        ),
        (
            "[[messages]]\nprefix = \"app\"\nlabels = [\"WalgraphCheckpoint\"]\n",
            "walgraph's own",
        ),
        (
            "[[messages]]\nprefix = \"walgraph_heartbeat\"\nlabels = [\"X\"]\n",
            "heartbeat prefix",
        ),
        (
            "[[messages]]\nprefix = \"a\"\nlabels = [\"X\"]\n[[messages]]\nprefix = \"b\"\nlabels = [\"X\"]\nkeys = { X = [\"k\"] }\n",
            "two sections key X differently",
        ),
        (
            "[[outbox]]\ntable = \"public.outbox\"\ncolumn = \"nope\"\nlabels = [\"X\"]\n",
            "has no such column",
        ),
        (
            "[[outbox]]\ntable = \"public.users\"\ncolumn = \"name\"\nlabels = [\"X\"]\n",
            "is both mapped and an outbox",
        ),
        (
            "[[outbox]]\ntable = \"public.outbox\"\ncolumn = \"payload\"\ntype_column = \"aggregatetype\"\nlabels = [\"X\"]\n",
            "gives only one of type_column and aggregate_column",
        ),
    ] {
        let e = mapping_with(extra).expect_err(extra);
        assert!(e.0.contains(want), "{extra}: {}", e.0);
    }
}

#[test]
fn an_outbox_row_in_debezium_s_shape_writes_its_aggregate() {
    let m = mapping_with(EVENTS).expect("compiles");
    let o = &m.outbox["public.outbox"];
    let invoice = |id: &str| NodeRef {
        label: Arc::from("Invoice"),
        key: Key(vec![Value::Text(id.into())]),
    };
    let ops = outbox_operations(
        o,
        Some(r#"{"total": 12.5}"#),
        Some(("Invoice", Value::Text("17".into()))),
        Lsn::new(3),
    )
    .expect("applies");
    assert_eq!(
        ops,
        vec![GraphOp::UpsertNode {
            node: invoice("17"),
            props: vec![(Arc::from("total"), Value::Float(12.5))],
            lsn: Lsn::new(3),
            source: None,
        }]
    );
    let ops = outbox_operations(
        o,
        None,
        Some(("Invoice", Value::Text("17".into()))),
        Lsn::new(4),
    )
    .expect("applies");
    assert_eq!(
        ops,
        vec![GraphOp::DeleteNode {
            node: invoice("17"),
            lsn: Lsn::new(4)
        }]
    );
    // A User's key is an integer: a text aggregate id is read as one.
    let ops = outbox_operations(
        o,
        Some("{}"),
        Some(("User", Value::Text("5".into()))),
        Lsn::new(5),
    )
    .expect("applies");
    assert!(
        matches!(&ops[0], GraphOp::UpsertNode { node, .. } if node.key == Key(vec![Value::Int(5)]))
    );
    // An operation is applied as it is, whatever the aggregate columns say.
    let ops = outbox_operations(
        o,
        Some(r#"{"op": "delete_node", "label": "Invoice", "key": {"id": "9"}}"#),
        Some(("User", Value::Text("5".into()))),
        Lsn::new(6),
    )
    .expect("applies");
    assert_eq!(
        ops,
        vec![GraphOp::DeleteNode {
            node: invoice("9"),
            lsn: Lsn::new(6)
        }]
    );
    for (payload, agg, want) in [
        (
            Some("{}"),
            ("Secret", Value::Text("1".into())),
            "the aggregate type `Secret`",
        ),
        (
            Some("{}"),
            ("User", Value::Text("x".into())),
            "is not an integer",
        ),
        (
            Some("[1"),
            ("User", Value::Text("1".into())),
            "it is not JSON",
        ),
        (
            Some("3"),
            ("User", Value::Text("1".into())),
            "neither an operation nor an object",
        ),
    ] {
        let e = outbox_operations(o, payload, Some(agg), Lsn::new(7)).expect_err("refused");
        assert!(e.0.contains(want), "{payload:?}: {}", e.0);
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        prop::sample::select(vec![
            "op",
            "label",
            "key",
            "User",
            "Event",
            "ABOUT",
            "merge_node",
            "delete_node",
            "merge_relationship",
            "delete_relationship",
            "id",
            "uid",
            "x"
        ])
        .prop_map(|s| serde_json::Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "op",
                    "label",
                    "key",
                    "type",
                    "from",
                    "to",
                    "properties",
                    "id",
                    "uid",
                    "n"
                ]),
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

proptest! {
    /// Whatever arrives, the parser answers (never panics), and what it
    /// accepts touches only allowed labels and types, keyed by the key.
    #[test]
    fn any_json_is_applied_within_the_rules_or_refused(v in json_value()) {
        let r = rules();
        if let Ok(ops) = operations(&v, &r, Lsn::new(1)) {
            for op in ops {
                let nodes: Vec<&NodeRef> = match &op {
                    GraphOp::UpsertNode { node, .. } | GraphOp::DeleteNode { node, .. } => vec![node],
                    GraphOp::MergeEdge { rel_type, from, to, .. } => {
                        prop_assert!(r.types.contains(rel_type));
                        vec![from, to]
                    }
                    GraphOp::DeleteEdge { rel_type, ends: Some((f, t)), .. } => {
                        prop_assert!(r.types.contains(rel_type));
                        vec![f, t]
                    }
                    other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                };
                for n in nodes {
                    let rule = r.labels.get(&n.label);
                    prop_assert!(rule.is_some());
                    prop_assert_eq!(n.key.0.len(), rule.map_or(0, |r| r.key.len()));
                    prop_assert!(n.key.0.iter().all(|v| !matches!(v, Value::Null)));
                }
            }
        }
    }

    /// Arbitrary text never panics the parser.
    #[test]
    fn arbitrary_text_is_refused_or_applied(s in ".{0,200}") {
        let _ = parse_operations(&s, &rules(), Lsn::new(1));
    }
}

#[test]
fn numeric_keys_are_read_in_postgres_form_only() {
    for (text, want) in [
        ("5", Some("5")),
        ("05.50", Some("5.5")),
        ("-0.0", Some("0")),
        ("NaN", Some("NaN")),
        ("1e5", None),
        (".5", None),
        ("5.", None),
        ("", None),
        ("+5", None),
    ] {
        assert_eq!(numeric_text(text).as_deref(), want, "{text}");
    }
}

#[test]
fn history_labels_keep_valid_from_and_valid_to_for_their_versions() {
    let text = DEMO_MAPPING.replacen(
        "label = \"Role\"\n",
        "label = \"Role\"\nhistory = true\n",
        1,
    ) + "[[messages]]\nprefix = \"app\"\nlabels = [\"Role\"]\n";
    let cfg = Config::parse(&text).expect("parses");
    let m = compile_config(&cfg, &catalog()).expect("compiles");
    let e = parse_operations(
        r#"{"op": "merge_node", "label": "Role", "key": {"id": "1"}, "properties": {"validTo": "x"}}"#,
        &m.messages["app"],
        Lsn::new(1),
    )
    .expect_err("refused");
    assert!(
        e.0.contains("`validTo` is what the versions of Role say"),
        "{}",
        e.0
    );
    let renamed = text.replacen(
        "label = \"Role\"\nhistory = true\n",
        "label = \"Role\"\nhistory = true\nrename = { name = \"validFrom\" }\n",
        1,
    );
    let cfg = Config::parse(&renamed).expect("parses");
    let e = compile_config(&cfg, &catalog()).expect_err("refused");
    assert!(e.0.contains("which the versions of Role use"), "{}", e.0);
}

#[test]
fn an_outbox_without_a_replica_identity_is_refused() {
    let mut c = catalog();
    if let Some(o) = c.get_mut("public.outbox") {
        o.primary_key.clear();
    }
    let cfg = Config::parse(&format!("{DEMO_MAPPING}{EVENTS}")).expect("parses");
    let e = compile_config(&cfg, &c).expect_err("refused");
    assert!(
        e.0.contains("Postgres refuses to delete or update its rows"),
        "{}",
        e.0
    );
}
