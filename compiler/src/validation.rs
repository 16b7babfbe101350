//! Request validation: protovalidate's `buf.validate` rules of a method's
//! input message, read from the descriptors and compiled into plan checks
//! (a field path and a test that must hold), so that the engine checks
//! them on the wire with the matcher, without decoding the message.
//!
//! Checked on the wire: `required`, `ignore`, the rules of scalar fields
//! (numbers, `bool`, `string` with its formats, `bytes`, enums), repeated
//! and map fields (counts, `unique`, items, keys and values), oneof
//! `required`, `any`, and the rules of fields of nested messages (when
//! set), of list elements and of map values. Written in CEL, run on the
//! decoded message: the user's `cel` rules, predefined rules (a rule's
//! value as `rule`), the well-known types' rules (protovalidate's own CEL,
//! the rules as `rules`) and message `oneof` rules. What is not compiled
//! (`well_known_regex`, messages nested inside elements, a value CEL cannot
//! hold) is a warning naming the field and the rule, never silently
//! skipped; a bad pattern or CEL rule is an error at the field's line.

use crate::cel_text::{cel_literal, literal_evaluates, macro_binders, presence_tests};
use crate::diag::{Diagnostic, Diagnostics};
use crate::paths::scalar_kind;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value as PValue};
use wirestub_plan::{self as plan, Check, MessageSel, Op, Shape, Source, Test, Value};

/// How deep nested messages are followed.
const MAX_DEPTH: usize = 8;
/// `FieldDescriptorProto.Type` of a message field, for violation paths.
const TYPE_MESSAGE: u8 = 11;

/// A field's step in a violation path: (number, name, type).
type Step = (u32, String, u8);

/// Adds the checks of the input message's rules to `method`.
/// The rules found but not checked yet, across a compilation: one warning
/// says them all ([`Unenforced::report`]), so that a proto tree full of
/// annotations is not a page of warnings on every build.
#[derive(Default)]
pub struct Unenforced(std::collections::BTreeSet<String>);

impl Unenforced {
    /// Pushes the one warning, if any rule went unchecked.
    pub fn report(self, diags: &mut Diagnostics) {
        const SHOWN: usize = 5;
        if self.0.is_empty() {
            return;
        }
        let n = self.0.len();
        let mut list: Vec<String> = self.0.into_iter().take(SHOWN).collect();
        if n > SHOWN {
            list.push(format!("and {} more", n - SHOWN));
        }
        diags.push(
            Diagnostic::warning(None, format!("{n} validation rule(s) are not enforced yet: {}", list.join("; ")))
                .with_help("with --validation on, requests are validated without them; README lists the rules checked"),
        );
    }
}

pub fn add_checks(
    method: &mut plan::Method,
    input: &MessageDescriptor,
    files: &std::collections::BTreeMap<String, crate::protos::Text>,
    unenforced: &mut Unenforced,
    diags: &mut Diagnostics,
) {
    let pool = input.parent_pool();
    // protovalidate's rules, then protoc-gen-validate's (the engine picks
    // with `--validation-source`).
    for (pgv, field, oneof, message) in [
        (false, "buf.validate.field", "buf.validate.oneof", "buf.validate.message"),
        (true, "validate.rules", "validate.required", "validate.disabled"),
    ] {
        let Some(field_ext) = pool.get_extension_by_name(field) else { continue };
        let mut cx = Cx {
            method: &mut *method,
            input: input.clone(),
            field_ext,
            oneof_ext: pool.get_extension_by_name(oneof),
            message_ext: pool.get_extension_by_name(message),
            predefined_ext: pool.get_extension_by_name("buf.validate.predefined").filter(|_| !pgv),
            unenforced: &mut *unenforced,
            diags: &mut *diags,
            files,
            regex_specs: Vec::new(),
            pgv,
            within: None,
            map_key: None,
            for_key: false,
            has_rules_memo: std::collections::HashMap::new(),
            oneof_members: Vec::new(),
        };
        cx.message(input, &[], &[], &[], 0, &mut Vec::new());
    }
}

struct Cx<'a> {
    method: &'a mut plan::Method,
    input: MessageDescriptor,
    field_ext: prost_reflect::ExtensionDescriptor,
    oneof_ext: Option<prost_reflect::ExtensionDescriptor>,
    message_ext: Option<prost_reflect::ExtensionDescriptor>,
    /// `(buf.validate.predefined)`: the CEL rules of an extension of
    /// protovalidate's rule messages (a predefined rule).
    predefined_ext: Option<prost_reflect::ExtensionDescriptor>,
    unenforced: &'a mut Unenforced,
    diags: &'a mut Diagnostics,
    /// The user's .proto files, by import name, for the spans of errors.
    files: &'a std::collections::BTreeMap<String, crate::protos::Text>,
    regex_specs: Vec<String>,
    /// Reading protoc-gen-validate's options (`validate.rules`).
    pgv: bool,
    /// Inside the elements of a repeated message field: the pick (every
    /// element) that paths below go through.
    within: Option<plan::Pick>,
    /// Building the rules of a map's keys or values: the keys' type, and
    /// whether the rules are the keys'.
    map_key: Option<plan::ScalarKind>,
    for_key: bool,
    has_rules_memo: std::collections::HashMap<String, bool>,
    /// The fields named by message `oneof` rules (full names).
    oneof_members: Vec<String>,
}

impl Cx<'_> {
    /// Where the element at `path` (a descriptor's path in its file) is
    /// declared, from the file's source info.
    fn span(&self, file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<crate::diag::Span> {
        let text = self.files.get(file.name())?;
        let info = file.file_descriptor_proto().source_code_info.as_ref()?;
        let location = info.location.iter().find(|l| l.path == path)?;
        let (line, col) = (*location.span.first()?, *location.span.get(1)?);
        let source = crate::diag::SourceFile::named(&text.shown, text.text.to_string());
        let mut span = source.line_span(u32::try_from(line).ok()? + 1);
        span.col = u32::try_from(col).ok()? + 1;
        // The declaration's first line, from its column.
        let rest = source.text.lines().nth(line as usize).unwrap_or("");
        span.len = rest.chars().skip(col as usize).count().max(1) as u32;
        Some(span)
    }

    /// Notes a rule the compiler cannot check yet (said once per field
    /// and rule, in one warning for the whole plan: see [`Unenforced`]).
    fn warn(&mut self, what: &str, field: &str, rule: &str) {
        let pool = self.input.parent_pool();
        let file = pool
            .get_message_by_name(field.rsplit_once('.').map_or(field, |(m, _)| m))
            .or_else(|| pool.get_message_by_name(field))
            .map(|m| format!(" ({})", m.parent_file().name()))
            .unwrap_or_default();
        self.unenforced.0.insert(format!("{what}: `{rule}` on `{field}`{file}"));
    }

    /// The checks of one message reached by `numbers` (field numbers from
    /// the input message), whose rules apply while every `guards` path is
    /// present.
    fn message(
        &mut self,
        desc: &MessageDescriptor,
        numbers: &[u32],
        steps: &[Step],
        guards: &[u32],
        depth: usize,
        open: &mut Vec<String>,
    ) {
        if depth > MAX_DEPTH || open.iter().any(|n| n == desc.full_name()) {
            return;
        }
        if let Some(ext) = &self.message_ext {
            let options = desc.options();
            if options.has_extension(ext) {
                match &*options.get_extension(ext) {
                    // protoc-gen-validate's `(validate.disabled)`.
                    PValue::Bool(true) => return,
                    PValue::Message(rules) => {
                        for (f, v) in rules.fields() {
                            match (f.name(), v) {
                                ("cel" | "cel_expression", PValue::List(list)) => {
                                    for rule in list {
                                        self.cel(
                                            rule,
                                            numbers,
                                            false,
                                            steps,
                                            desc.full_name(),
                                            (&desc.parent_file(), desc.path()),
                                            Bound::default(),
                                        );
                                    }
                                }
                                ("oneof", PValue::List(list)) if !self.pgv => {
                                    for rule in list {
                                        if let PValue::Message(rule) = rule {
                                            self.message_oneof(desc, rule, numbers, steps);
                                            if let Some(PValue::List(names)) =
                                                rule.get_field_by_name("fields").as_deref()
                                            {
                                                let full = |n: &str| format!("{}.{n}", desc.full_name());
                                                let names = names.iter().filter_map(|v| v.as_str().map(full));
                                                self.oneof_members.extend(names);
                                            }
                                        }
                                    }
                                }
                                _ => self.warn("message rules", desc.full_name(), f.name()),
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        open.push(desc.full_name().to_string());
        for oneof in desc.oneofs().filter(|o| !o.is_synthetic()) {
            let required = self.oneof_ext.as_ref().is_some_and(|ext| {
                let options = oneof.options();
                options.has_extension(ext)
                    && match &*options.get_extension(ext) {
                        PValue::Message(r) => get_bool(r, "required"),
                        PValue::Bool(b) => *b,
                        _ => false,
                    }
            });
            if required && self.within.is_some() {
                self.warn("oneof rules inside repeated elements", desc.full_name(), oneof.name());
            } else if required {
                let members = oneof.fields().map(|f| f.number()).collect();
                let path = plan::FieldPath {
                    name: oneof.name().to_string(),
                    numbers: numbers.to_vec(),
                    kind: plan::ScalarKind::Int32,
                    default: Value::I64(0),
                    shape: Shape::OneofCase { members },
                    message: MessageSel::Single,
                    picks: Vec::new(),
                };
                let mut at = steps.to_vec();
                at.push((0, oneof.name().to_string(), 0));
                let test = Test::Not(Box::new(Test::Op(Op::Eq(Value::I64(0)))));
                self.push(path, test, guards, "required", "exactly one field is required in oneof", at, Vec::new());
            }
        }
        for field in desc.fields() {
            self.field(&field, numbers, steps, guards, depth, open);
        }
        open.pop();
    }

    fn field(
        &mut self,
        field: &FieldDescriptor,
        numbers: &[u32],
        steps: &[Step],
        guards: &[u32],
        depth: usize,
        open: &mut Vec<String>,
    ) {
        let options = field.options();
        let rules = match options.has_extension(&self.field_ext) {
            true => match &*options.get_extension(&self.field_ext) {
                PValue::Message(m) => Some(m.clone()),
                _ => None,
            },
            false => None,
        };
        // IGNORE_ALWAYS (3): nothing about the field is checked.
        let mut ignore = rules.as_ref().map(|r| get_enum(r, "ignore")).unwrap_or(0);
        // A member of a message `oneof` rule is ignored at its zero value
        // (protovalidate sets IGNORE_IF_ZERO_VALUE on it).
        if ignore == 0 && self.oneof_members.iter().any(|m| m == field.full_name()) {
            ignore = 1;
        }
        if ignore == 3 {
            return;
        }
        // protoc-gen-validate: `message: { required, skip }`.
        let pgv_message = rules.as_ref().filter(|_| self.pgv).and_then(|r| {
            let f = r.descriptor().get_field_by_name("message")?;
            match &*r.get_field(&f) {
                PValue::Message(m) if r.has_field(&f) => Some((get_bool(m, "required"), get_bool(m, "skip"))),
                _ => None,
            }
        });
        let mut numbers = numbers.to_vec();
        numbers.push(field.number());
        let mut at = steps.to_vec();
        at.push((field.number(), field.name().to_string(), kind_code(field)));
        let name = field.full_name().to_string();
        let repeated = field.is_list() || field.is_map();
        let message_kind = matches!(field.kind(), Kind::Message(_));

        if let Some(rules) = &rules {
            for (f, v) in rules.fields() {
                if let ("cel" | "cel_expression", PValue::List(list)) = (f.name(), v) {
                    for rule in list {
                        let file = field.parent_file();
                        self.cel(
                            rule,
                            &numbers,
                            true,
                            &at,
                            &name,
                            (&file, field.path()),
                            Bound { skip_zero: ignore == 1, zero: crate::cel_text::zero(field), ..Bound::default() },
                        );
                    }
                }
            }
            let presence = field.supports_presence() && !repeated;
            if get_bool(rules, "required") || pgv_message.is_some_and(|(required, _)| required) {
                let (path, test) = if repeated {
                    (self.path(field, &numbers, Shape::Repeated), len_test(Op::Gte(Value::U64(1))))
                } else if presence {
                    (self.path(field, &numbers, Shape::Singular), Test::Op(Op::Exists))
                } else {
                    let p = self.path(field, &numbers, Shape::Singular);
                    let zero = p.default.clone();
                    (p, Test::Not(Box::new(Test::Op(Op::Eq(zero)))))
                };
                self.push(
                    path,
                    test,
                    guards,
                    "required",
                    "value is required",
                    at.clone(),
                    vec![(25, "required".into(), 8)],
                );
            }
            if let Some((type_field, type_rules)) = type_rules(rules) {
                // Rules of another type than the field's (`int32` rules on
                // a string): refused, as protovalidate refuses them;
                // protoc-gen-validate's are left out, said (trees made for
                // tools that ignored them compile).
                let expected = rules_kind(field);
                let fits =
                    expected.is_none_or(|e| e == type_field.name()) || (self.pgv && type_field.name() == "message");
                if !fits && self.pgv {
                    let what = format!("rules for `{}` fields", type_field.name());
                    self.warn(&what, &name, expected.unwrap_or_default());
                    return;
                }
                if !fits {
                    let span = self.span(&field.parent_file(), field.path());
                    let what = expected.unwrap_or_default();
                    self.diags.push(Diagnostic::error(
                        span,
                        format!(
                            "`{name}` ({}): its rules are `{}` rules, but the field takes `{what}` rules",
                            field.parent_file().name(),
                            type_field.name()
                        ),
                    ));
                    return;
                }
                let wrapper = matches!(field.kind(), Kind::Message(m) if m.full_name().ends_with("Value") && m.full_name().starts_with("google.protobuf."));
                if wrapper && !field.is_list() && !field.is_map() {
                    // The rules of a wrapper's value (the field inside it).
                    self.warn("rules of a wrapper type's value", &name, type_field.name());
                    return;
                }
                // protoc-gen-validate's `ignore_empty`: like IGNORE_IF_ZERO_VALUE.
                let skip_zero = ignore == 1 || get_bool(&type_rules, "ignore_empty");
                self.type_rules(field, &numbers, &at, guards, &type_field, &type_rules, presence, skip_zero);
            }
        }
        // Rules of a nested message apply when it is set.
        let skip = pgv_message.is_some_and(|(_, skip)| skip);
        if let (Kind::Message(m), false) = (field.kind(), skip) {
            let plain = !m.full_name().starts_with("google.protobuf.");
            if !repeated && message_kind && plain && self.within.is_none() && self.has_rules(&m) {
                let guard = self.intern(self.path(field, &numbers, Shape::Singular));
                let mut g = guards.to_vec();
                g.push(guard);
                self.message(&m, &numbers, &at, &g, depth + 1, open);
            } else if field.is_list() && plain && self.within.is_none() && self.has_rules(&m) {
                // The rules of each element's fields, checked on every
                // element; a violation names the element.
                self.within = Some(plan::Pick { step: numbers.len() as u32 - 1, elem: plan::Elem::All });
                self.message(&m, &numbers, &at, guards, depth + 1, open);
                self.within = None;
            } else if field.is_map() && self.within.is_none() {
                // The rules of each map value's fields, on every entry (an
                // entry without a value has an empty one); a violation
                // names the entry by its key: `stock["a"].sku`.
                let value = m.map_entry_value_field();
                if let Kind::Message(vm) = value.kind() {
                    if !vm.full_name().starts_with("google.protobuf.") && self.has_rules(&vm) {
                        self.within = Some(plan::Pick { step: numbers.len() as u32 - 1, elem: plan::Elem::All });
                        self.map_key = Some(scalar_kind(&m.map_entry_key_field().kind()));
                        let mut value_numbers = numbers.clone();
                        value_numbers.push(value.number());
                        self.message(&vm, &value_numbers, &at, guards, depth + 1, open);
                        self.within = None;
                        self.map_key = None;
                    }
                }
            } else if (repeated || self.within.is_some()) && self.has_rules(&m) {
                self.warn("rules of messages inside repeated elements or map values", &name, m.full_name());
            }
        }
    }

    /// The rules of a field's type (`string`, `int32`, `repeated`, ...).
    #[allow(clippy::too_many_arguments)]
    fn type_rules(
        &mut self,
        field: &FieldDescriptor,
        numbers: &[u32],
        at: &[Step],
        guards: &[u32],
        type_field: &FieldDescriptor,
        rules: &DynamicMessage,
        presence: bool,
        skip_zero: bool,
    ) {
        let kind = type_field.name();
        let name = field.full_name().to_string();
        let rule_base = (type_field.number(), kind.to_string(), TYPE_MESSAGE);
        self.predefined(rules, numbers, at, field, skip_zero);
        // A rule applies only when the field is set (presence) or, with
        // IGNORE_IF_ZERO_VALUE, when it is not its zero value.
        let applies = |cx: &mut Self, path: &plan::FieldPath, test: Test| -> Test {
            let mut escapes = Vec::new();
            if presence || skip_zero {
                escapes.push(Test::Not(Box::new(Test::Op(Op::Exists))));
            }
            if skip_zero && path.shape == Shape::Singular {
                escapes.push(Test::Op(Op::Eq(path.default.clone())));
            }
            if skip_zero && path.shape == Shape::Repeated {
                escapes.push(len_test(Op::Eq(Value::U64(0))));
            }
            let _ = cx;
            match escapes.is_empty() {
                true => test,
                false => {
                    escapes.push(test);
                    Test::Any(escapes)
                }
            }
        };
        match kind {
            "repeated" | "map" => {
                let path = self.path(field, numbers, Shape::Repeated);
                for (f, v) in rules.fields() {
                    let (id, test, message) = match (kind, f.name(), v) {
                        ("repeated", "min_items", PValue::U64(n)) => (
                            "repeated.min_items",
                            Op::Gte(Value::U64(*n)),
                            format!("must contain at least {n} item(s)"),
                        ),
                        ("repeated", "unique", PValue::Bool(true)) if !matches!(field.kind(), Kind::Message(_)) => {
                            let test = applies(self, &path, Test::Op(Op::Unique));
                            let rule = vec![rule_base.clone(), (f.number(), f.name().to_string(), kind_code(&f))];
                            self.push(
                                path.clone(),
                                test,
                                guards,
                                "repeated.unique",
                                "repeated value must contain unique items",
                                at.to_vec(),
                                rule,
                            );
                            continue;
                        }
                        ("repeated", "max_items", PValue::U64(n)) => (
                            "repeated.max_items",
                            Op::Lte(Value::U64(*n)),
                            format!("must contain no more than {n} item(s)"),
                        ),
                        ("map", "min_pairs", PValue::U64(n)) => {
                            ("map.min_pairs", Op::Gte(Value::U64(*n)), format!("map must be at least {n} entries"))
                        }
                        ("map", "max_pairs", PValue::U64(n)) => {
                            ("map.max_pairs", Op::Lte(Value::U64(*n)), format!("map must be at most {n} entries"))
                        }
                        (_, "ignore_empty", _) => continue,
                        ("map", part @ ("keys" | "values"), PValue::Message(rules)) => {
                            self.map_entries(field, numbers, at, guards, &f, rules, &rule_base, part == "keys");
                            continue;
                        }
                        ("repeated", "items", PValue::Message(items)) => {
                            self.items(field, numbers, at, guards, &f, items, &rule_base);
                            continue;
                        }
                        (_, other, _) => {
                            self.warn("rule", &name, &format!("{kind}.{other}"));
                            continue;
                        }
                    };
                    let test = applies(self, &path, len_test(test));
                    let rule = vec![rule_base.clone(), (f.number(), f.name().to_string(), kind_code(&f))];
                    self.push(path.clone(), test, guards, id, &message, at.to_vec(), rule);
                }
            }
            "duration" | "timestamp" | "field_mask" if !self.pgv => {
                self.standard_cel(rules, numbers, at, field, skip_zero, None)
            }
            "any" => {
                // `in` and `not_in` on the type URL of an Any that is set.
                let Kind::Message(any) = field.kind() else { return };
                let Some(url_field) = any.get_field(1) else { return };
                let mut url_numbers = numbers.to_vec();
                url_numbers.push(1);
                let path = self.path(&url_field, &url_numbers, Shape::Singular);
                let mut g = guards.to_vec();
                g.push(self.intern(self.path(field, numbers, Shape::Singular)));
                for (f, v) in rules.fields() {
                    let urls = match v {
                        PValue::List(l) => l
                            .iter()
                            .filter_map(|x| match x {
                                PValue::String(s) => Some(Value::Bytes(s.as_bytes().to_vec())),
                                _ => None,
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let in_list = Test::Op(Op::In(urls));
                    let (id, test, message) = match f.name() {
                        "in" => ("any.in", in_list, "type URL must be in the allow list"),
                        "not_in" => {
                            ("any.not_in", Test::Not(Box::new(in_list)), "type URL must not be in the block list")
                        }
                        other => {
                            self.warn("rule", &name, &format!("any.{other}"));
                            continue;
                        }
                    };
                    let rule = vec![rule_base.clone(), (f.number(), f.name().to_string(), kind_code(&f))];
                    self.push(path.clone(), test, &g, id, message, at.to_vec(), rule);
                }
            }
            "duration" | "timestamp" | "field_mask" => self.warn("rule", &name, kind),
            _ => {
                let path = self.path(field, numbers, Shape::Singular);
                if kind == "string" && !self.pgv {
                    self.standard_cel(rules, numbers, at, field, skip_zero, Some("well_known_regex"));
                }
                for (id, test, message, rule_field) in scalar_rules(kind, rules, field, &path, self) {
                    let test = applies(self, &path, test);
                    let rule = vec![rule_base.clone(), rule_field];
                    self.push(path.clone(), test, guards, &id, &message, at.to_vec(), rule);
                }
            }
        }
    }

    /// A message's `oneof` rule (`MessageOneofRule { fields, required }`):
    /// at most one of the fields set, and with `required` one, where a
    /// field is set as protovalidate has it (a message present, a list or
    /// map not empty, a scalar not its zero value). Written in CEL on the
    /// message, rule id `message.oneof`.
    fn message_oneof(&mut self, desc: &MessageDescriptor, rule: &DynamicMessage, numbers: &[u32], steps: &[Step]) {
        let names: Vec<String> = match rule.get_field_by_name("fields").as_deref() {
            Some(PValue::List(l)) => l.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        let span = self.span(&desc.parent_file(), desc.path());
        let mut terms = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let problem = match desc.get_field_by_name(name) {
                None => Some(format!("names `{name}`, which is not one of its fields")),
                Some(_) if names[..i].contains(name) => Some(format!("names `{name}` twice")),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                let file = desc.parent_file();
                let text = format!("`{}` ({}): its oneof rule {problem}", desc.full_name(), file.name());
                self.diags.push(Diagnostic::error(span, text));
                return;
            }
            // Set as protovalidate has it: present (explicit presence),
            // not empty (lists, maps), not zero (the others), which is
            // what the engine lists under `@set`.
            terms.push(format!("('{name}' in this['@set'] ? 1 : 0)"));
        }
        if names.is_empty() {
            let file = desc.parent_file();
            let text = format!("`{}` ({}): its oneof rule names no field", desc.full_name(), file.name());
            self.diags.push(Diagnostic::error(span, text));
            return;
        }
        let count = terms.join(" + ");
        let list = names.join(", ");
        let mut expression = format!("{count} > 1 ? 'only one of {list} can be set' : ''");
        if get_bool(rule, "required") {
            expression = format!("{count} == 0 ? 'one of {list} must be set' : ({expression})");
        }
        let pool = desc.parent_pool();
        let Some(rule_desc) = pool.get_message_by_name("buf.validate.Rule") else { return };
        let mut cel_rule = DynamicMessage::new(rule_desc);
        cel_rule.set_field_by_name("id", PValue::String("message.oneof".into()));
        cel_rule.set_field_by_name("expression", PValue::String(expression));
        let file = desc.parent_file();
        let rule = PValue::Message(cel_rule);
        self.cel(&rule, numbers, false, steps, desc.full_name(), (&file, desc.path()), Bound::default());
    }

    /// The predefined rules set in `rules` (a field's `string`, `int32`,
    /// `repeated`... rules): extensions of those messages that carry CEL
    /// rules of their own, which read the extension's value as `rule`.
    fn predefined(
        &mut self,
        rules: &DynamicMessage,
        numbers: &[u32],
        at: &[Step],
        field: &FieldDescriptor,
        skip_zero: bool,
    ) {
        let Some(ext) = self.predefined_ext.clone() else { return };
        let file = field.parent_file();
        // `rules`: the standard rules set beside it (extensions are read
        // through `rule`).
        let all = cel_literal(&PValue::Message(rules.clone())).unwrap_or_default();
        for (extension, value) in rules.extensions() {
            let site = Site { numbers, at, field, file: &file };
            self.rule_cel(&ext, &extension.options(), extension.full_name(), value, &all, skip_zero, site);
        }
    }

    /// The CEL rules `(buf.validate.predefined)` gives a rule field (whose
    /// options are `options`), run with the rule's `value` as `rule` and
    /// the field's rules message `all` as `rules`.
    #[allow(clippy::too_many_arguments)]
    fn rule_cel(
        &mut self,
        ext: &prost_reflect::ExtensionDescriptor,
        options: &DynamicMessage,
        name: &str,
        value: &PValue,
        all: &str,
        skip_zero: bool,
        site: Site<'_>,
    ) {
        if !options.has_extension(ext) {
            return;
        }
        let PValue::Message(predefined) = &*options.get_extension(ext) else { return };
        let owner = site.field.full_name();
        let Some(literal) = cel_literal(value) else {
            self.warn("rule value CEL cannot hold", owner, name);
            return;
        };
        if let Some(PValue::List(list)) = predefined.get_field_by_name("cel").as_deref() {
            for rule in list {
                let zero = crate::cel_text::zero(site.field);
                let bound = Bound { rule: literal.clone(), rules: all.to_string(), skip_zero, zero };
                self.cel(rule, site.numbers, true, site.at, owner, (site.file, site.field.path()), bound);
            }
        }
    }

    /// The rules protovalidate itself defines in CEL (a timestamp's or a
    /// duration's): each set rule's own CEL rules, reading the rule's
    /// value as `rule` and the whole rules message as `rules`.
    fn standard_cel(
        &mut self,
        rules: &DynamicMessage,
        numbers: &[u32],
        at: &[Step],
        field: &FieldDescriptor,
        skip_zero: bool,
        only: Option<&str>,
    ) {
        let (owner, file) = (field.full_name(), field.parent_file());
        if let Some(name) = only {
            if !rules.fields().any(|(f, _)| f.name() == name) {
                return;
            }
        }
        let Some(ext) = self.predefined_ext.clone() else {
            self.warn("rule", owner, rules.descriptor().name());
            return;
        };
        let Some(all) = cel_literal(&PValue::Message(rules.clone())) else {
            self.warn("rules CEL cannot hold", owner, rules.descriptor().name());
            return;
        };
        for (f, v) in rules.fields() {
            if only.is_some_and(|name| f.name() != name) {
                continue;
            }
            let site = Site { numbers, at, field, file: &file };
            self.rule_cel(&ext, &f.options(), f.name(), v, &all, skip_zero, site);
        }
    }

    /// A CEL rule (`Rule { id, message, expression }`, or a bare
    /// expression), parsed now so that a bad one is a compile error;
    /// `bound`: what it reads besides `this` and `now`.
    #[allow(clippy::too_many_arguments)]
    fn cel(
        &mut self,
        rule: &PValue,
        numbers: &[u32],
        field: bool,
        at: &[Step],
        owner: &str,
        (file, place): (&prost_reflect::FileDescriptor, &[i32]),
        bound: Bound,
    ) {
        let (id, message, expression) = match rule {
            PValue::Message(r) => {
                let text = |n: &str| match r.get_field_by_name(n).as_deref() {
                    Some(PValue::String(s)) => s.clone(),
                    _ => String::new(),
                };
                (text("id"), text("message"), text("expression"))
            }
            PValue::String(e) => (e.clone(), String::new(), e.clone()),
            _ => return,
        };
        // `has(this.f)` with protobuf's meaning (see `presence_tests`).
        let expression = presence_tests(&expression);
        let program = match cel::Program::compile(&expression) {
            Ok(p) => p,
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                let span = self.span(file, place);
                self.diags.push(Diagnostic::error(
                    span,
                    format!("`{owner}` ({}): its CEL rule `{id}` does not parse: {first}", file.name()),
                ));
                return;
            }
        };
        // The variables a rule reads: `this`, `now`, `rule` and `rules`
        // where they have a value (predefined and standard rules), and what
        // its macros bind (`x` in `this.all(x, x > 0)`). A rule reading
        // another (a misspelling, Wishmock's bare field names, a user's
        // `rules`) would fail every request: it is left out, said.
        let binders = macro_binders(&expression);
        let known = |v: &str| {
            v == "this"
                || v == "now"
                || (v == "rule" && !bound.rule.is_empty())
                || (v == "rules" && !bound.rules.is_empty())
                || binders.iter().any(|b| b == v)
        };
        let references = program.references();
        let unknown: Vec<&str> = references.variables().into_iter().filter(|v| !known(v)).collect();
        if !unknown.is_empty() {
            let name = if id.is_empty() { &expression } else { &id };
            self.warn(&format!("CEL rule `{name}` uses {}", unknown.join(", ")), owner, "cel");
            return;
        }
        if !literal_evaluates(&bound.rule) || !literal_evaluates(&bound.rules) {
            let name = if id.is_empty() { &expression } else { &id };
            self.warn(&format!("CEL rule `{name}` has a value CEL cannot hold"), owner, "cel");
            return;
        }
        // Tried on the field's zero value: a function that does not exist
        // or operands of the wrong types fail whatever the value, and so
        // would every request.
        if let Some(zero) = &bound.zero {
            if let Err(problem) = crate::cel_text::probe(&program, zero, &bound.rule, &bound.rules) {
                let name = if id.is_empty() { &expression } else { &id };
                let span = self.span(file, place);
                self.diags.push(Diagnostic::error(
                    span,
                    format!("`{owner}` ({}): its CEL rule `{name}` {problem}", file.name()),
                ));
                return;
            }
        }
        self.method.cel_checks.push(plan::CelCheck {
            numbers: numbers.to_vec(),
            field,
            expression,
            rule_id: id,
            message,
            path: at.to_vec(),
            rule: bound.rule,
            rules: bound.rules,
            skip_zero: bound.skip_zero,
            // Inside the elements of a list, or the values of a map.
            each: self.within.map(|w| (w.step, self.map_key.map_or(0, |k| k as u8))),
        });
    }

    /// `repeated.items`: the element rules of a repeated scalar field,
    /// checked on every element (`tags[all]`), a violation naming the
    /// element.
    #[allow(clippy::too_many_arguments)]
    fn items(
        &mut self,
        field: &FieldDescriptor,
        numbers: &[u32],
        at: &[Step],
        guards: &[u32],
        items_field: &FieldDescriptor,
        items: &DynamicMessage,
        rule_base: &Step,
    ) {
        let name = field.full_name().to_string();
        if matches!(field.kind(), Kind::Message(_)) || self.within.is_some() {
            self.warn("rules of repeated message elements", &name, "repeated.items");
            return;
        }
        for (f, _) in items.fields() {
            if !matches!(
                f.name(),
                "type"
                    | "float"
                    | "double"
                    | "int32"
                    | "int64"
                    | "uint32"
                    | "uint64"
                    | "sint32"
                    | "sint64"
                    | "fixed32"
                    | "fixed64"
                    | "sfixed32"
                    | "sfixed64"
                    | "bool"
                    | "string"
                    | "bytes"
                    | "enum"
            ) {
                self.warn("rule", &name, &format!("repeated.items.{}", f.name()));
            }
        }
        let Some((type_field, type_rules)) = type_rules(items) else { return };
        let mut path = self.path(field, numbers, Shape::Singular);
        path.picks = vec![plan::Pick { step: numbers.len() as u32 - 1, elem: plan::Elem::All }];
        path.name = format!("{}[all]", path.name);
        let kind = type_field.name().to_string();
        for (id, test, message, rule_field) in scalar_rules(&kind, &type_rules, field, &path, self) {
            let rule = vec![
                rule_base.clone(),
                (items_field.number(), "items".to_string(), TYPE_MESSAGE),
                (type_field.number(), kind.clone(), TYPE_MESSAGE),
                rule_field,
            ];
            self.push(path.clone(), test, guards, &id, &message, at.to_vec(), rule);
        }
    }

    /// `map.keys` / `map.values`: rules checked on every entry's key or
    /// value, a violation naming the entry by its key.
    #[allow(clippy::too_many_arguments)]
    fn map_entries(
        &mut self,
        field: &FieldDescriptor,
        numbers: &[u32],
        at: &[Step],
        guards: &[u32],
        part_field: &FieldDescriptor,
        rules: &DynamicMessage,
        rule_base: &Step,
        keys: bool,
    ) {
        let name = field.full_name().to_string();
        let Kind::Message(entry) = field.kind() else { return };
        let (key, value) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let target = if keys { key.clone() } else { value };
        if matches!(target.kind(), Kind::Message(_)) || self.within.is_some() {
            self.warn("rules of map message values", &name, part_field.name());
            return;
        }
        let Some((type_field, type_rules)) = type_rules(rules) else { return };
        let mut entry_numbers = numbers.to_vec();
        entry_numbers.push(target.number());
        self.within = Some(plan::Pick { step: numbers.len() as u32 - 1, elem: plan::Elem::All });
        let mut path = self.path(&target, &entry_numbers, Shape::Singular);
        self.within = None;
        path.name = format!("{}[all].{}", self.names(numbers), target.name());
        let kind = type_field.name().to_string();
        self.map_key = Some(scalar_kind(&key.kind()));
        self.for_key = keys;
        for (id, test, message, rule_field) in scalar_rules(&kind, &type_rules, &target, &path, self) {
            let rule = vec![
                rule_base.clone(),
                (part_field.number(), part_field.name().to_string(), TYPE_MESSAGE),
                (type_field.number(), kind.clone(), TYPE_MESSAGE),
                rule_field,
            ];
            self.push(path.clone(), test, guards, &id, &message, at.to_vec(), rule);
        }
        self.map_key = None;
        self.for_key = false;
    }

    fn path(&self, field: &FieldDescriptor, numbers: &[u32], shape: Shape) -> plan::FieldPath {
        let (kind, default) = match field.kind() {
            Kind::Message(_) => (plan::ScalarKind::Bytes, Value::Bytes(Vec::new())),
            k => {
                let s = scalar_kind(&k);
                (s, crate::paths::to_plan_value(&field.default_value(), s))
            }
        };
        let default = if shape == Shape::Repeated { zero_of(kind) } else { default };
        plan::FieldPath {
            name: self.names(numbers),
            numbers: numbers.to_vec(),
            kind,
            default,
            shape,
            message: MessageSel::Single,
            picks: self.within.into_iter().collect(),
        }
    }

    /// Whether a message, or one it holds, carries any rules (of its
    /// fields, its oneofs or itself); remembered per type, so that shared
    /// and recursive types are looked at once.
    fn has_rules(&mut self, desc: &MessageDescriptor) -> bool {
        if let Some(&known) = self.has_rules_memo.get(desc.full_name()) {
            return known;
        }
        // While a type is being looked at, a cycle back to it adds nothing.
        self.has_rules_memo.insert(desc.full_name().to_string(), false);
        let own = |ext: &Option<prost_reflect::ExtensionDescriptor>, options: DynamicMessage| {
            ext.as_ref().is_some_and(|e| options.has_extension(e))
        };
        let mut found = own(&self.message_ext, desc.options())
            || desc.oneofs().any(|o| own(&self.oneof_ext, o.options()))
            || desc.fields().any(|f| f.options().has_extension(&self.field_ext));
        if !found {
            for f in desc.fields() {
                if let Kind::Message(m) = f.kind() {
                    if self.has_rules(&m) {
                        found = true;
                        break;
                    }
                }
            }
        }
        self.has_rules_memo.insert(desc.full_name().to_string(), found);
        found
    }

    /// The dotted field names of a path of numbers from the input message.
    fn names(&self, numbers: &[u32]) -> String {
        let mut desc = self.input.clone();
        let mut out = Vec::new();
        for n in numbers {
            let Some(f) = desc.get_field(*n) else { break };
            out.push(f.name().to_string());
            match f.kind() {
                Kind::Message(m) => desc = m,
                _ => break,
            }
        }
        out.join(".")
    }

    fn intern(&mut self, path: plan::FieldPath) -> u32 {
        self.method.intern_field(&path)
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        path: plan::FieldPath,
        test: Test,
        guards: &[u32],
        rule_id: &str,
        message: &str,
        at: Vec<Step>,
        rule: Vec<Step>,
    ) {
        let source = Source::Field(self.intern(path));
        self.method.checks.push(Check {
            source,
            test,
            guards: guards.to_vec(),
            rule_id: rule_id.to_string(),
            message: message.to_string(),
            path: at,
            rule,
            pgv: self.pgv,
            map_key: self.map_key,
            for_key: self.for_key,
        });
    }

    /// A `pattern` rule's regular expression as a plan regex index.
    fn regex(&mut self, pattern: &str, field: &FieldDescriptor) -> Option<u32> {
        use regex_automata::dfa::{dense, StartKind};
        if let Some(i) = self.regex_specs.iter().position(|p| p == pattern) {
            return Some(i as u32 + self.first_regex());
        }
        let config = dense::Config::new()
            .start_kind(StartKind::Unanchored)
            .dfa_size_limit(Some(8 << 20))
            .determinize_size_limit(Some(8 << 20));
        match dense::Builder::new().configure(config).build(pattern) {
            Ok(dfa) => {
                let (bytes, pad) = dfa.to_bytes_little_endian();
                self.method.regexes.push(bytes[pad..].to_vec());
                self.regex_specs.push(pattern.to_string());
                Some(self.method.regexes.len() as u32 - 1)
            }
            Err(e) => {
                let mut cause: &dyn std::error::Error = &e;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                let detail = cause.to_string().lines().last().unwrap_or_default().trim().to_string();
                let span = self.span(&field.parent_file(), field.path());
                self.diags.push(Diagnostic::error(
                    span,
                    format!(
                        "`{}` ({}): its validation pattern `{pattern}` does not compile: {detail}",
                        field.full_name(),
                        field.parent_file().name()
                    ),
                ));
                None
            }
        }
    }

    fn first_regex(&self) -> u32 {
        (self.method.regexes.len() - self.regex_specs.len()) as u32
    }
}

/// The (id, test, message, rule step) of each rule set in a scalar
/// field's rules message.
fn scalar_rules(
    kind: &str,
    rules: &DynamicMessage,
    field: &FieldDescriptor,
    path: &plan::FieldPath,
    cx: &mut Cx,
) -> Vec<(String, Test, String, Step)> {
    let mut out = Vec::new();
    let value = |v: &PValue| crate::paths::to_plan_value(v, path.kind);
    let shown = |v: &PValue| match v {
        PValue::String(s) => s.clone(),
        PValue::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        PValue::List(l) => format!("[{}]", l.iter().map(show_value).collect::<Vec<_>>().join(", ")),
        other => show_value(other),
    };
    let get = |n: &str| {
        rules
            .descriptor()
            .get_field_by_name(n)
            .filter(|f| rules.has_field(f))
            .map(|f| (rules.get_field(&f).into_owned(), f))
    };
    let step = |f: &FieldDescriptor| (f.number(), f.name().to_string(), kind_code(f));
    let op = |o: Op| Test::Op(o);
    let not = |t: Test| Test::Not(Box::new(t));
    let bytes_like = matches!(kind, "string" | "bytes");
    for (f, v) in rules.fields() {
        let id = format!("{kind}.{}", f.name());
        let s = shown(v);
        let entry: Option<(Test, String)> = match f.name() {
            "const" => Some((
                op(Op::Eq(value(v))),
                if kind == "string" { format!("must equal `{s}`") } else { format!("must equal {s}") },
            )),
            "in" => match v {
                PValue::List(l) if !l.is_empty() => {
                    Some((op(Op::In(l.iter().map(value).collect())), format!("must be in list {s}")))
                }
                _ => None,
            },
            "not_in" => match v {
                PValue::List(l) if !l.is_empty() => {
                    Some((not(op(Op::In(l.iter().map(value).collect()))), format!("must not be in list {s}")))
                }
                _ => None,
            },
            "example" | "ignore_empty" => None,
            // Run as protovalidate's own CEL (`Cx::standard_cel`).
            "well_known_regex" | "strict" if kind == "string" && !cx.pgv => None,
            "defined_only" if get_bool(rules, "defined_only") => {
                let Kind::Enum(e) = field.kind() else { continue };
                let values = e.values().map(|v| Value::I64(v.number() as i64)).collect();
                Some((op(Op::In(values)), "value must be one of the defined enum values".to_string()))
            }
            "defined_only" => None,
            "finite" if matches!(v, PValue::Bool(true)) => {
                let inf = Value::F64(f64::INFINITY);
                let ninf = Value::F64(f64::NEG_INFINITY);
                // NaN fails both orderings; infinities are excluded.
                Some((Test::All(vec![op(Op::Gt(ninf)), op(Op::Lt(inf))]), "must be finite".to_string()))
            }
            "finite" => None,
            "lt" | "lte" if get("gt").is_none() && get("gte").is_none() => {
                let u = value(v);
                let (o, m) = match f.name() {
                    "lt" => (Op::Lt(u), format!("must be less than {s}")),
                    _ => (Op::Lte(u), format!("must be less than or equal to {s}")),
                };
                Some((op(o), m))
            }
            "lt" | "lte" => None,
            "gt" | "gte" => {
                let low = value(v);
                let upper = get("lt").map(|(u, _)| (true, u)).or_else(|| get("lte").map(|(u, _)| (false, u)));
                let (lo_op, lo_text) = match f.name() {
                    "gt" => (Op::Gt(low.clone()), "greater than"),
                    _ => (Op::Gte(low.clone()), "greater than or equal to"),
                };
                match upper {
                    None => Some((op(lo_op), format!("must be {lo_text} {s}"))),
                    Some((strict, u)) => {
                        let hi = value(&u);
                        let (hi_op, hi_text, suffix) = match strict {
                            true => (Op::Lt(hi.clone()), "less than", "lt"),
                            false => (Op::Lte(hi.clone()), "less than or equal to", "lte"),
                        };
                        let us = shown(&u);
                        // protovalidate: an upper bound at or above the
                        // lower one is a range the value must be in;
                        // below it, one the value must be out of.
                        let exclusive = wirestub_order(&hi, &low) == Some(std::cmp::Ordering::Less);
                        let base = format!("{kind}.{}_{suffix}", f.name());
                        if exclusive {
                            out.push((
                                format!("{base}_exclusive"),
                                Test::Any(vec![op(lo_op), op(hi_op)]),
                                format!("must be {lo_text} {s} or {hi_text} {us}"),
                                step(&f),
                            ));
                        } else {
                            out.push((
                                base,
                                Test::All(vec![op(lo_op), op(hi_op)]),
                                format!("must be {lo_text} {s} and {hi_text} {us}"),
                                step(&f),
                            ));
                        }
                        None
                    }
                }
            }
            "len" | "min_len" | "max_len" if bytes_like => {
                let PValue::U64(n) = v else { continue };
                let n = Value::U64(*n);
                let o = match f.name() {
                    "len" => Op::Eq(n),
                    "min_len" => Op::Gte(n),
                    _ => Op::Lte(n),
                };
                let unit = if kind == "string" { "characters" } else { "bytes" };
                let m = match f.name() {
                    "len" => format!("must be {s} {unit}"),
                    "min_len" => format!("must be at least {s} {unit}"),
                    _ => format!("must be at most {s} {unit}"),
                };
                let inner = Box::new(Test::Op(o));
                Some((if kind == "string" { op(Op::Chars(inner)) } else { op(Op::Len(inner)) }, m))
            }
            "len_bytes" | "min_bytes" | "max_bytes" => {
                let PValue::U64(n) = v else { continue };
                let n = Value::U64(*n);
                let (o, m) = match f.name() {
                    "len_bytes" => (Op::Eq(n), format!("must be {s} bytes")),
                    "min_bytes" => (Op::Gte(n), format!("must be at least {s} bytes")),
                    _ => (Op::Lte(n), format!("must be at most {s} bytes")),
                };
                Some((op(Op::Len(Box::new(Test::Op(o)))), m))
            }
            "prefix" | "suffix" | "contains" | "not_contains" if bytes_like => {
                let needle = match v {
                    PValue::String(t) => t.as_bytes().to_vec(),
                    PValue::Bytes(b) => b.to_vec(),
                    _ => continue,
                };
                let quoted = if kind == "string" { format!("`{s}`") } else { s.clone() };
                Some(match f.name() {
                    "prefix" => (op(Op::Prefix(needle)), format!("does not have prefix {quoted}")),
                    "suffix" => (op(Op::Suffix(needle)), format!("does not have suffix {quoted}")),
                    "contains" if kind == "string" => {
                        (op(Op::Contains(Value::Bytes(needle))), format!("does not contain substring {quoted}"))
                    }
                    "contains" => (op(Op::Contains(Value::Bytes(needle))), format!("does not contain {quoted}")),
                    _ => (not(op(Op::Contains(Value::Bytes(needle)))), format!("contains substring {quoted}")),
                })
            }
            "email"
            | "uuid"
            | "tuuid"
            | "ipv4"
            | "ipv6"
            | "ip"
            | "hostname"
            | "uri"
            | "uri_ref"
            | "address"
            | "host_and_port"
            | "ip_prefix"
            | "ipv4_prefix"
            | "ipv6_prefix"
            | "ip_with_prefixlen"
            | "ipv4_with_prefixlen"
            | "ipv6_with_prefixlen"
                if kind == "string" =>
            {
                if !matches!(v, PValue::Bool(true)) {
                    continue;
                }
                use plan::Format as F;
                // A regular expression where one says it (protovalidate's
                // own for the UUIDs; the HTML standard's e-mail address),
                // a native check for the rest; what a value must be, and
                // (but for URI references, which may be empty) what an
                // empty one is not.
                let (check, what, empty) = match f.name() {
                    "email" => (
                        Err(
                            r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$",
                        ),
                        "a valid email address",
                        Some("a valid email address"),
                    ),
                    "uuid" => (
                        Err(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
                        "a valid UUID",
                        Some("a valid UUID"),
                    ),
                    "tuuid" => (Err(r"^[0-9a-fA-F]{32}$"), "a valid trimmed UUID", Some("a valid trimmed UUID")),
                    "ipv4" => (Ok(F::Ipv4), "a valid IPv4 address", Some("a valid IPv4 address")),
                    "ipv6" => (Ok(F::Ipv6), "a valid IPv6 address", Some("a valid IPv6 address")),
                    "ip" => (Ok(F::Ip), "a valid IP address", Some("a valid IP address")),
                    "hostname" => (Ok(F::Hostname), "a valid hostname", Some("a valid hostname")),
                    "uri" => (Ok(F::Uri), "a valid URI", Some("a valid URI")),
                    "uri_ref" => (Ok(F::UriRef), "a valid URI Reference", None),
                    "address" => {
                        (Ok(F::Address), "a valid hostname, or ip address", Some("a valid hostname, or ip address"))
                    }
                    "host_and_port" => (
                        Ok(F::HostAndPort),
                        "a valid host (hostname or IP address) and port pair",
                        Some("a valid host and port pair"),
                    ),
                    "ip_prefix" => (Ok(F::IpPrefix), "a valid IP prefix", Some("a valid IP prefix")),
                    "ipv4_prefix" => (Ok(F::Ipv4Prefix), "a valid IPv4 prefix", Some("a valid IPv4 prefix")),
                    "ipv6_prefix" => (Ok(F::Ipv6Prefix), "a valid IPv6 prefix", Some("a valid IPv6 prefix")),
                    "ip_with_prefixlen" => (Ok(F::IpWithPrefixlen), "a valid IP prefix", Some("a valid IP prefix")),
                    "ipv4_with_prefixlen" => (
                        Ok(F::Ipv4WithPrefixlen),
                        "a valid IPv4 address with prefix length",
                        Some("a valid IPv4 address with prefix length"),
                    ),
                    _ => (
                        Ok(F::Ipv6WithPrefixlen),
                        "a valid IPv6 address with prefix length",
                        Some("a valid IPv6 address with prefix length"),
                    ),
                };
                let test = match check {
                    Ok(format) => op(Op::Format(format)),
                    Err(pattern) => {
                        let Some(i) = cx.regex(pattern, field) else { continue };
                        op(Op::Regex(i))
                    }
                };
                let Some(empty_what) = empty else {
                    out.push((id, test, format!("must be {what}"), step(&f)));
                    continue;
                };
                let empty = Value::Bytes(Vec::new());
                // An empty value is its own violation; others must match.
                out.push((
                    format!("{id}_empty"),
                    not(op(Op::Eq(empty.clone()))),
                    format!("value is empty, which is not {empty_what}"),
                    step(&f),
                ));
                Some((Test::Any(vec![op(Op::Eq(empty)), test]), format!("must be {what}")))
            }
            "pattern" => {
                let PValue::String(p) = v else { continue };
                let Some(i) = cx.regex(p, field) else { continue };
                let m = if kind == "string" {
                    format!("does not match regex pattern `{p}`")
                } else {
                    format!("must match regex pattern `{p}`")
                };
                Some((op(Op::Regex(i)), m))
            }
            other => {
                cx.warn("rule", field.full_name(), &format!("{kind}.{other}"));
                None
            }
        };
        if let Some((test, message)) = entry {
            out.push((id, test, message, step(&f)));
        }
    }
    out
}

/// The name of the rules a field takes (`string`, `int32`, `repeated`,
/// `map`, `timestamp`, ...; a wrapper's are its value's); None for a
/// message without rules of its own.
fn rules_kind(field: &FieldDescriptor) -> Option<&'static str> {
    if field.is_map() {
        return Some("map");
    }
    if field.is_list() {
        return Some("repeated");
    }
    Some(match field.kind() {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Enum(_) => "enum",
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Any" => "any",
            "google.protobuf.Duration" => "duration",
            "google.protobuf.Timestamp" => "timestamp",
            "google.protobuf.FieldMask" => "field_mask",
            "google.protobuf.DoubleValue" => "double",
            "google.protobuf.FloatValue" => "float",
            "google.protobuf.Int64Value" => "int64",
            "google.protobuf.UInt64Value" => "uint64",
            "google.protobuf.Int32Value" => "int32",
            "google.protobuf.UInt32Value" => "uint32",
            "google.protobuf.BoolValue" => "bool",
            "google.protobuf.StringValue" => "string",
            "google.protobuf.BytesValue" => "bytes",
            _ => return None,
        },
    })
}

/// Where a field's CEL rules go: its path from the input message (field
/// numbers, violation steps), the field and its file.
#[derive(Clone, Copy)]
struct Site<'a> {
    numbers: &'a [u32],
    at: &'a [Step],
    field: &'a FieldDescriptor,
    file: &'a prost_reflect::FileDescriptor,
}

/// What a CEL rule reads besides `this` and `now`, as CEL literals
/// (empty: not bound).
#[derive(Default)]
struct Bound {
    /// A predefined rule's value.
    rule: String,
    /// The field's whole rules message.
    rules: String,
    /// The field is ignored at its zero value.
    skip_zero: bool,
    /// The field's zero value as CEL (scalars, lists, maps), on which the
    /// rule is tried at compile time (`cel_text::probe`).
    zero: Option<cel::Value>,
}

/// Orders two plan values of the same class.
fn wirestub_order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::I64(x), Value::I64(y)) => Some(x.cmp(y)),
        (Value::U64(x), Value::U64(y)) => Some(x.cmp(y)),
        (Value::F64(x), Value::F64(y)) => x.partial_cmp(y),
        _ => None,
    }
}

fn show_value(v: &PValue) -> String {
    match v {
        PValue::Bool(b) => b.to_string(),
        PValue::I32(i) => i.to_string(),
        PValue::I64(i) => i.to_string(),
        PValue::U32(u) => u.to_string(),
        PValue::U64(u) => u.to_string(),
        PValue::F32(f) => f.to_string(),
        PValue::F64(f) => f.to_string(),
        PValue::String(s) => s.clone(),
        PValue::EnumNumber(n) => n.to_string(),
        PValue::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        other => format!("{other:?}"),
    }
}

fn len_test(op: Op) -> Test {
    Test::Op(Op::Len(Box::new(Test::Op(op))))
}

fn zero_of(kind: plan::ScalarKind) -> Value {
    match kind.value_class() {
        plan::ValueClass::I64 => Value::I64(0),
        plan::ValueClass::U64 => Value::U64(0),
        plan::ValueClass::F64 => Value::F64(0.0),
        plan::ValueClass::Bool => Value::Bool(false),
        plan::ValueClass::Bytes => Value::Bytes(Vec::new()),
    }
}

/// The set member of `FieldRules.type` and its rules message.
fn type_rules(rules: &DynamicMessage) -> Option<(FieldDescriptor, DynamicMessage)> {
    let oneof = rules.descriptor().oneofs().find(|o| o.name() == "type")?;
    let field = oneof.fields().find(|f| rules.has_field(f))?;
    let value = rules.get_field(&field);
    match &*value {
        PValue::Message(m) => Some((field.clone(), m.clone())),
        _ => None,
    }
}

fn get_bool(m: &DynamicMessage, name: &str) -> bool {
    m.descriptor()
        .get_field_by_name(name)
        .is_some_and(|f| m.has_field(&f) && matches!(&*m.get_field(&f), PValue::Bool(true)))
}

fn get_enum(m: &DynamicMessage, name: &str) -> i32 {
    match m.descriptor().get_field_by_name(name).map(|f| m.get_field(&f).into_owned()) {
        Some(PValue::EnumNumber(n)) => n,
        _ => 0,
    }
}

/// A field's type as `FieldDescriptorProto.Type` numbers it.
fn kind_code(field: &FieldDescriptor) -> u8 {
    match field.kind() {
        Kind::Message(_) if field.is_group() => 10,
        Kind::Message(_) => TYPE_MESSAGE,
        k => scalar_kind(&k) as u8,
    }
}
