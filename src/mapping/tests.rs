//! Compiling mappings: the demo mapping, and one sentence for each bad one.

use super::*;
use crate::config::Config;

/// The demo schema's catalog.
pub fn demo_catalog() -> Catalog {
    let t = |cols: &[&str], pk: &[&str]| TableInfo {
        columns: cols.iter().map(|s| s.to_string()).collect(),
        primary_key: pk.iter().map(|s| s.to_string()).collect(),
        unique: vec![pk.iter().map(|s| s.to_string()).collect()],
        replica_identity: 'd',
        ..TableInfo::default()
    };
    let mut c = Catalog::new();
    c.insert(
        "public.users".into(),
        t(&["id", "name", "password_hash", "created_at"], &["id"]),
    );
    c.insert("public.roles".into(), t(&["id", "name"], &["id"]));
    c.insert(
        "public.user_roles".into(),
        t(
            &["user_id", "role_id", "granted_at"],
            &["user_id", "role_id"],
        ),
    );
    c.insert(
        "public.orders".into(),
        t(&["id", "user_id", "total"], &["id"]),
    );
    c
}

pub const DEMO_MAPPING: &str = r#"
[[node]]
table = "public.users"
label = "User"
exclude = ["password_hash"]
rename = { created_at = "createdAt" }

[[node]]
table = "public.roles"
label = "Role"

[[node]]
table = "public.orders"
label = "Order"

[[relationship]]
table = "public.orders"
type = "PLACED_BY"
from = { label = "Order", columns = ["id"] }
to = { label = "User", columns = ["user_id"] }

[[relationship]]
table = "public.user_roles"
type = "HAS_ROLE"
from = { label = "User", columns = ["user_id"] }
to = { label = "Role", columns = ["role_id"] }
properties = ["granted_at"]
"#;

pub fn demo_mapping() -> Mapping {
    let cfg = Config::parse(DEMO_MAPPING).unwrap();
    compile(&cfg.nodes, &cfg.relationships, &demo_catalog()).unwrap()
}

#[test]
fn demo_mapping_compiles() {
    let m = demo_mapping();
    let users = m.tables["public.users"].node.as_ref().unwrap();
    assert_eq!(&*users.label, "User");
    let props: Vec<&str> = users.props.iter().map(|p| &*p.property).collect();
    assert_eq!(props, ["name", "createdAt"]);
    let orders = &m.tables["public.orders"];
    assert_eq!(orders.rels[0].kind, RelKind::RowOwned { own_is_from: true });
    let ur = &m.tables["public.user_roles"];
    assert!(ur.node.is_none());
    assert_eq!(
        ur.rels[0].kind,
        RelKind::Edge {
            pair_identity: true
        }
    );
}

fn compile_err(toml_text: &str, catalog: &Catalog) -> String {
    let cfg = Config::parse(toml_text).unwrap();
    compile(&cfg.nodes, &cfg.relationships, catalog)
        .unwrap_err()
        .0
}

#[test]
fn bad_mappings_are_refused_with_one_sentence() {
    let c = demo_catalog();
    let e = compile_err("[[node]]\ntable=\"public.nope\"\nlabel=\"X\"\n", &c);
    assert!(e.contains("public.nope, which does not exist"), "{e}");
    let e = compile_err(
        "[[node]]\ntable=\"public.users\"\nlabel=\"U\"\nexclude=[\"pw\"]\n",
        &c,
    );
    assert!(e.contains("column `pw`"), "{e}");
    let e = compile_err(
        "[[node]]\ntable=\"public.users\"\nlabel=\"U\"\nkey=[\"name\"]\n",
        &c,
    );
    assert!(e.contains("not unique"), "{e}");
    let e = compile_err(
        "[[node]]\ntable=\"public.users\"\nlabel=\"Bad Label\"\n",
        &c,
    );
    assert!(e.contains("not allowed"), "{e}");
    let e = compile_err("[[node]]\ntable=\"users\"\nlabel=\"U\"\n", &c);
    assert!(e.contains("schema-qualified"), "{e}");
    let mut nopk = c.clone();
    nopk.get_mut("public.roles").unwrap().primary_key.clear();
    nopk.get_mut("public.roles").unwrap().unique.clear();
    let e = compile_err("[[node]]\ntable=\"public.roles\"\nlabel=\"R\"\n", &nopk);
    assert!(e.contains("no primary key"), "{e}");
}

#[test]
fn a_generated_column_named_by_the_mapping_is_refused_with_why() {
    let mut c = demo_catalog();
    if let Some(users) = c.get_mut("public.users") {
        users.generated.push("search".into());
    }
    let e = compile_err(
        "[[node]]\ntable = \"public.users\"\nlabel = \"User\"\ninclude = [\"search\"]\n",
        &c,
    );
    assert!(e.contains("generated column"), "{e}");
}

#[test]
fn a_foreign_key_of_another_type_than_the_key_it_names_is_refused() {
    use crate::decode::value::oid;
    let mut c = demo_catalog();
    let set = |c: &mut Catalog, t: &str, types: &[u32]| {
        c.get_mut(t).unwrap().types = types.to_vec();
    };
    set(
        &mut c,
        "public.users",
        &[oid::INT4, oid::TEXT, oid::TEXT, oid::TIMESTAMPTZ],
    );
    set(&mut c, "public.roles", &[oid::INT4, oid::TEXT]);
    set(
        &mut c,
        "public.user_roles",
        &[oid::INT8, oid::INT2, oid::TIMESTAMPTZ],
    );
    // int8 and int2 meet int4 keys: all are integers.
    set(
        &mut c,
        "public.orders",
        &[oid::INT8, oid::INT8, oid::NUMERIC],
    );
    let cfg = Config::parse(DEMO_MAPPING).unwrap();
    compile(&cfg.nodes, &cfg.relationships, &c).unwrap();
    set(
        &mut c,
        "public.orders",
        &[oid::INT8, oid::NUMERIC, oid::NUMERIC],
    );
    let e = compile_err(DEMO_MAPPING, &c);
    assert!(
        e.contains("public.orders.user_id (numeric)") && e.contains("public.users.id (integer)"),
        "{e}"
    );
    set(
        &mut c,
        "public.orders",
        &[oid::INT8, oid::INT8, oid::NUMERIC],
    );
    set(
        &mut c,
        "public.user_roles",
        &[oid::UUID, oid::INT2, oid::TIMESTAMPTZ],
    );
    let e = compile_err(DEMO_MAPPING, &c);
    assert!(e.contains("user_roles.user_id (uuid)"), "{e}");
}

#[test]
fn properties_on_a_foreign_key_relationship_are_refused() {
    let text = DEMO_MAPPING.replace(
        "to = { label = \"User\", columns = [\"user_id\"] }",
        "to = { label = \"User\", columns = [\"user_id\"] }\nproperties = [\"total\"]",
    );
    assert_ne!(text, DEMO_MAPPING);
    let e = compile_err(&text, &demo_catalog());
    assert!(e.contains("`properties` is for join tables"), "{e}");
}

#[test]
fn a_relationship_may_end_at_a_label_another_process_maps() {
    let text = r#"
[[node]]
table = "public.orders"
label = "Order"
[[relationship]]
table = "public.orders"
type = "PLACED_BY"
from = { label = "Order", columns = ["id"] }
to = { label = "User", columns = ["user_id"] }
"#;
    let cfg = Config::parse(text).expect("parses");
    let e = compile_config(&cfg, &demo_catalog()).expect_err("User is not mapped");
    assert!(e.0.contains("[[external]]"), "{}", e.0);
    let with = format!("{text}[[external]]\nlabel = \"User\"\nkey = [\"id\"]\n");
    let cfg = Config::parse(&with).expect("parses");
    let m = compile_config(&cfg, &demo_catalog()).expect("compiles");
    assert!(
        !m.tables.contains_key("public.users"),
        "nothing of users is synced here"
    );
    assert!(m
        .node_keys()
        .contains(&(Arc::from("User"), vec![Arc::from("id")])));
    let rel = &m.tables["public.orders"].rels[0];
    assert_eq!(&*rel.to.label, "User");
    assert_eq!(rel.to.key_props, vec![Arc::<str>::from("id")]);
    let twice = format!("{with}[[node]]\ntable = \"public.users\"\nlabel = \"User\"\n");
    let cfg = Config::parse(&twice).expect("parses");
    let e = compile_config(&cfg, &demo_catalog()).expect_err("mapped twice");
    assert!(e.0.contains("both mapped here and [[external]]"), "{}", e.0);
}
