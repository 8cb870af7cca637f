//! Canonical printer: nodes in [`Graph::topo_order`], attributes sorted, floats in shortest round-trip
//! form, names quoted only when they must be.

use super::lexer::is_name_char;
use super::{ConstantMode, PrintOptions, Printed};
use crate::{f8e4m3_to_f32, nibble, Attr, DType, Dim, Graph, NodeId, OpKind, Tensor, TensorData, TensorType, Value};
use std::collections::HashSet;
use std::fmt::Write;

/// Quotes a string literal, escaping what the lexer unescapes.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `%`/`@` name body: bare when every character is a name character (`:` only inside), else quoted.
pub fn name(s: &str) -> String {
    let bare =
        !s.is_empty() && !s.starts_with(':') && !s.ends_with(':') && s.chars().all(|c| is_name_char(c) || c == ':');
    if bare {
        s.to_string()
    } else {
        quote(s)
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn ident_or_quoted(s: &str) -> String {
    if is_ident(s) {
        s.to_string()
    } else {
        quote(s)
    }
}

pub fn type_text(ty: &TensorType) -> String {
    let mut out = ty.dtype.name().to_string();
    match &ty.shape {
        None => out.push_str("[*]"),
        Some(s) => {
            out.push('[');
            for (i, d) in s.0.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match d {
                    Dim::Known(n) => {
                        let _ = write!(out, "{n}");
                    }
                    // `?` is the unknown dimension, so a symbol spelled `?` is quoted by ident_or_quoted.
                    Dim::Sym(s) => out.push_str(&ident_or_quoted(s)),
                    Dim::Unknown => out.push('?'),
                }
            }
            out.push(']');
        }
    }
    out
}

/// Shortest round-trip text of an f32, always recognisable as a float.
pub fn f32_text(x: f32) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{x:?}")
    }
}

fn f64_text(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{x:?}")
    }
}

/// Canonical NaN bit patterns, printed as `nan`; other NaNs print as raw hex bits.
pub const F32_NAN: u32 = 0x7fc0_0000;
pub const F64_NAN: u64 = 0x7ff8_0000_0000_0000;
pub const F16_NAN: u16 = 0x7e00;
pub const BF16_NAN: u16 = 0x7fc0;
pub const F8_NAN: u8 = 0x7f;

/// Each element of a tensor as text.
fn elements(t: &Tensor, bytes: &[u8]) -> Vec<String> {
    let n = t.numel();
    let le = |i: usize, w: usize| -> u64 {
        let mut v = 0u64;
        for (k, b) in bytes[i * w..(i + 1) * w].iter().enumerate() {
            v |= (*b as u64) << (8 * k);
        }
        v
    };
    (0..n)
        .map(|i| match t.dtype {
            DType::F32 => {
                let bits = le(i, 4) as u32;
                let x = f32::from_bits(bits);
                if x.is_nan() && bits != F32_NAN {
                    format!("0x{bits:x}")
                } else {
                    f32_text(x)
                }
            }
            DType::F64 => {
                let bits = le(i, 8);
                let x = f64::from_bits(bits);
                if x.is_nan() && bits != F64_NAN {
                    format!("0x{bits:x}")
                } else {
                    f64_text(x)
                }
            }
            DType::F16 | DType::BF16 => {
                let bits = le(i, 2) as u16;
                let (x, canonical) = if t.dtype == DType::F16 {
                    (half::f16::from_bits(bits).to_f32(), F16_NAN)
                } else {
                    (half::bf16::from_bits(bits).to_f32(), BF16_NAN)
                };
                if x.is_nan() && bits != canonical {
                    format!("0x{bits:x}")
                } else {
                    f32_text(x)
                }
            }
            DType::F8E4M3 => {
                let b = bytes[i];
                let x = f8e4m3_to_f32(b);
                if x.is_nan() && b != F8_NAN {
                    format!("0x{b:x}")
                } else {
                    f32_text(x)
                }
            }
            DType::I64 => (le(i, 8) as i64).to_string(),
            DType::I32 => (le(i, 4) as u32 as i32).to_string(),
            DType::I16 => (le(i, 2) as u16 as i16).to_string(),
            DType::I8 => (bytes[i] as i8).to_string(),
            DType::U64 => le(i, 8).to_string(),
            DType::U32 => le(i, 4).to_string(),
            DType::U16 => le(i, 2).to_string(),
            DType::U8 => bytes[i].to_string(),
            DType::I4 => crate::sign_extend_nibble(nibble(bytes, i)).to_string(),
            DType::U4 => nibble(bytes, i).to_string(),
            DType::Bool => match bytes[i] {
                0 => "false".into(),
                1 => "true".into(),
                b => b.to_string(),
            },
        })
        .collect()
}

fn dims_text(dims: &[usize]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

struct Printer<'a> {
    options: &'a PrintOptions,
    out: String,
    resources: Vec<(String, Tensor)>,
    keys: HashSet<String>,
}

impl Printer<'_> {
    fn tensor(&mut self, t: &Tensor, key_hint: &str) -> String {
        let head = format!("{}[{}]", t.dtype.name(), dims_text(&t.dims));
        let bytes = match &t.data {
            TensorData::Elided { digest } => return format!("dense<{head}, digest {}>", quote(digest)),
            TensorData::Bytes(b) => b,
        };
        // Only well-formed data can be printed element by element.
        let numel = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let well_formed = numel.and_then(|n| n.checked_mul(t.dtype.bits())).map(|b| b.div_ceil(8)) == Some(bytes.len());
        let inline_limit = match self.options.constants {
            ConstantMode::Inline => usize::MAX,
            ConstantMode::Elide { max_inline_elements } | ConstantMode::External { max_inline_elements } => {
                max_inline_elements
            }
        };
        if well_formed && numel.is_some_and(|n| n <= inline_limit) {
            return format!("dense<{head} [{}]>", elements(t, bytes).join(", "));
        }
        if let ConstantMode::External { .. } = self.options.constants {
            let mut key = key_hint.to_string();
            let mut k = 1;
            while !self.keys.insert(key.clone()) {
                key = format!("{key_hint}#{k}");
                k += 1;
            }
            self.resources.push((key.clone(), t.clone()));
            return format!("dense_resource<{head}, {}>", quote(&key));
        }
        format!("dense<{head}, digest {}>", quote(&t.digest()))
    }

    fn attr(&mut self, a: &Attr, key_hint: &str) -> String {
        match a {
            Attr::Int(v) => v.to_string(),
            Attr::Float(v) => f32_text(*v),
            Attr::Str(s) => quote(s),
            Attr::Ints(v) if v.is_empty() => "ints[]".into(),
            Attr::Floats(v) if v.is_empty() => "floats[]".into(),
            Attr::Strs(v) if v.is_empty() => "strs[]".into(),
            Attr::Ints(v) => format!("[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
            Attr::Floats(v) => format!("[{}]", v.iter().map(|x| f32_text(*x)).collect::<Vec<_>>().join(", ")),
            Attr::Strs(v) => format!("[{}]", v.iter().map(|x| quote(x)).collect::<Vec<_>>().join(", ")),
            Attr::DType(d) => d.name().into(),
            Attr::Tensor(t) => self.tensor(t, key_hint),
        }
    }

    fn value_ref(graph: &Graph, v: Value) -> String {
        let out = graph.contains(v.node).then(|| graph.node(v.node).outputs.get(v.port as usize)).flatten();
        match out {
            Some(o) => format!("%{}", name(&o.name)),
            // Malformed graphs still print (for debugging); the parser will reject this reference.
            None => format!("%{}", quote(&format!("<invalid {}:{}>", v.node.index(), v.port))),
        }
    }

    fn node(&mut self, graph: &Graph, id: NodeId) {
        let node = graph.node(id);
        let mut line = String::from("  ");
        if !node.outputs.is_empty() {
            let outs: Vec<String> = node.outputs.iter().map(|o| format!("%{}", name(&o.name))).collect();
            line.push_str(&outs.join(", "));
            line.push_str(" = ");
        }
        line.push_str(node.op.kind.name());
        if node.num_inputs > 0 {
            let mut slots = vec!["_".to_string(); node.num_inputs];
            for e in graph.petgraph().edges_directed(id, petgraph::Direction::Incoming) {
                use petgraph::visit::EdgeRef;
                if let Some(slot) = slots.get_mut(e.weight().dst_port as usize) {
                    *slot = Self::value_ref(graph, Value::new(e.source(), e.weight().src_port));
                }
            }
            let _ = write!(line, "({})", slots.join(", "));
        }
        if !node.op.attrs.is_empty() {
            let base = node.outputs.first().map(|o| o.name.as_str()).unwrap_or(node.name.as_str());
            let mut parts = Vec::with_capacity(node.op.attrs.len());
            for (key, a) in &node.op.attrs {
                let hint = if node.op.kind == OpKind::Constant && key == "value" {
                    base.to_string()
                } else {
                    format!("{base}.{key}")
                };
                parts.push(format!("{} = {}", ident_or_quoted(key), self.attr(a, &hint)));
            }
            let _ = write!(line, " {{{}}}", parts.join(", "));
        }
        if !node.outputs.is_empty() {
            let types: Vec<String> = node.outputs.iter().map(|o| type_text(&o.ty)).collect();
            let _ = write!(line, " : {}", types.join(", "));
        }
        if node.outputs.first().map_or("", |o| o.name.as_str()) != node.name {
            let _ = write!(line, " loc({})", quote(&node.name));
        }
        self.out.push_str(&line);
        self.out.push('\n');
    }
}

pub fn print(graph: &Graph, options: &PrintOptions) -> Printed {
    let mut p = Printer { options, out: String::new(), resources: Vec::new(), keys: HashSet::new() };
    let params: Vec<String> = graph
        .graph_inputs()
        .iter()
        .map(|&id| {
            let node = graph.node(id);
            match node.outputs.first() {
                Some(o) => {
                    let loc = if node.name != o.name { format!(" loc({})", quote(&node.name)) } else { String::new() };
                    format!("%{}: {}{loc}", name(&o.name), type_text(&o.ty))
                }
                None => format!("%{}: f32[*]", quote("<input without output>")),
            }
        })
        .collect();
    let outputs: Vec<String> = graph.graph_outputs().iter().map(|o| format!("%{}", name(&o.name))).collect();
    let _ = writeln!(p.out, "graph @{}({}) -> ({}) {{", name(&graph.name), params.join(", "), outputs.join(", "));
    // A cyclic graph has no topological order; index order still shows it (the parser will reject it).
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids().collect());
    let inputs: HashSet<NodeId> = graph.graph_inputs().iter().copied().collect();
    for id in order {
        if !inputs.contains(&id) {
            p.node(graph, id);
        }
    }
    let returns: Vec<String> = graph.graph_outputs().iter().map(|o| Printer::value_ref(graph, o.value)).collect();
    if returns.is_empty() {
        p.out.push_str("  return\n}\n");
    } else {
        let _ = writeln!(p.out, "  return {}\n}}", returns.join(", "));
    }
    Printed { text: p.out, resources: p.resources }
}
