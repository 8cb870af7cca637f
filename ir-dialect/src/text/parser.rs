//! Recursive-descent parser for the `.qir` format. Never panics: every malformed input is a
//! [`ParseError`] with the line and column of the offending token.

use super::lexer::{lex, Tok, Token};
use super::printer::{BF16_NAN, F16_NAN, F32_NAN, F64_NAN, F8_NAN};
use super::ParseError;
use crate::{f32_to_f8e4m3, pack_nibbles, Attr, Attrs, DType, Dim, Graph, Op, OpKind, Shape, Tensor, TensorData};
use crate::{TensorType, Value, ValueInfo};
use bytes::Bytes;

/// Supplies the bytes of `dense_resource<..., "key">` constants.
pub type Resolver<'r> = dyn FnMut(&str) -> Option<Bytes> + 'r;

struct Parser<'r, 'a> {
    toks: Vec<Token>,
    pos: usize,
    resolve: &'a mut Resolver<'r>,
}

type R<T> = Result<T, ParseError>;

impl Parser<'_, '_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].tok
    }

    fn peek_at(&self, k: usize) -> &Tok {
        &self.toks[(self.pos + k).min(self.toks.len() - 1)].tok
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err_here(&self, message: impl Into<String>) -> ParseError {
        let t = &self.toks[self.pos.min(self.toks.len() - 1)];
        ParseError { line: t.line, col: t.col, message: message.into() }
    }

    fn unexpected(&self, what: &str) -> ParseError {
        self.err_here(format!("expected {what}, found {}", self.peek().describe()))
    }

    fn eat(&mut self, c: char) -> bool {
        if *self.peek() == Tok::Punct(c) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> R<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("'{c}'")))
        }
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Ident(w) if w == word)
    }

    fn keyword(&mut self, word: &str) -> R<()> {
        if self.is_keyword(word) {
            self.next();
            Ok(())
        } else {
            Err(self.unexpected(&format!("'{word}'")))
        }
    }

    fn ident(&mut self, what: &str) -> R<String> {
        match self.peek() {
            Tok::Ident(w) => {
                let w = w.clone();
                self.next();
                Ok(w)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn value_name(&mut self) -> R<String> {
        match self.peek() {
            Tok::Value(n) if !n.is_empty() => {
                let n = n.clone();
                self.next();
                Ok(n)
            }
            Tok::Value(_) => Err(self.err_here("value names must not be empty")),
            _ => Err(self.unexpected("a %value")),
        }
    }

    fn string(&mut self, what: &str) -> R<String> {
        match self.peek() {
            Tok::Str(s) => {
                let s = s.clone();
                self.next();
                Ok(s)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn dtype(&mut self) -> R<DType> {
        let at = self.pos;
        let word = self.ident("a dtype")?;
        DType::from_name(&word).ok_or_else(|| {
            self.pos = at;
            self.err_here(format!("unknown dtype '{word}'"))
        })
    }

    fn uint(&mut self, what: &str) -> R<u64> {
        match self.peek() {
            Tok::Int(s) => {
                let v = s.parse::<u64>().map_err(|_| self.err_here(format!("{what} {s} is out of range")))?;
                self.next();
                Ok(v)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    /// `dtype[d0,d1,...]`, `dtype[]` or `dtype[*]`.
    fn tensor_type(&mut self) -> R<TensorType> {
        let dtype = self.dtype()?;
        self.expect('[')?;
        if self.eat('*') {
            self.expect(']')?;
            return Ok(TensorType::unranked(dtype));
        }
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                dims.push(match self.peek().clone() {
                    Tok::Int(_) => Dim::Known(self.uint("a dimension")?),
                    Tok::Punct('?') => {
                        self.next();
                        Dim::Unknown
                    }
                    Tok::Ident(s) | Tok::Str(s) => {
                        self.next();
                        Dim::sym(&s)
                    }
                    _ => return Err(self.unexpected("a dimension (number, symbol or '?')")),
                });
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(TensorType::new(dtype, Shape(dims)))
    }

    fn loc(&mut self) -> R<Option<String>> {
        if !self.is_keyword("loc") {
            return Ok(None);
        }
        self.next();
        self.expect('(')?;
        let s = self.string("a quoted node name")?;
        self.expect(')')?;
        Ok(Some(s))
    }

    fn graph(&mut self) -> R<Graph> {
        self.keyword("graph")?;
        let name = match self.next() {
            Tok::Global(n) => n,
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("the graph name (@name)"));
            }
        };
        let mut g = Graph::new(name);
        self.expect('(')?;
        if !self.eat(')') {
            loop {
                let at = self.pos;
                let value = self.value_name()?;
                self.expect(':')?;
                let ty = self.tensor_type()?;
                let v = g.add_input(&value, ty).map_err(|e| self.err_at(at, e.to_string()))?;
                if let Some(loc) = self.loc()? {
                    g.node_mut(v.node).name = loc;
                }
                if self.eat(')') {
                    break;
                }
                self.expect(',')?;
            }
        }
        if self.next() != Tok::Arrow {
            self.pos -= 1;
            return Err(self.unexpected("'->'"));
        }
        self.expect('(')?;
        let mut output_names = Vec::new();
        if !self.eat(')') {
            loop {
                output_names.push(self.value_name()?);
                if self.eat(')') {
                    break;
                }
                self.expect(',')?;
            }
        }
        self.expect('{')?;
        while !self.is_keyword("return") {
            self.statement(&mut g)?;
        }
        self.next();
        let mut values = Vec::new();
        if matches!(self.peek(), Tok::Value(_)) {
            loop {
                values.push(self.operand(&g)?.ok_or_else(|| self.err_here("return values cannot be absent"))?);
                if !self.eat(',') {
                    break;
                }
            }
        }
        if values.len() != output_names.len() {
            return Err(self.err_here(format!(
                "the graph declares {} outputs but returns {} values",
                output_names.len(),
                values.len()
            )));
        }
        for (name, v) in output_names.into_iter().zip(values) {
            g.add_output(name, v);
        }
        self.expect('}')?;
        if *self.peek() != Tok::Eof {
            return Err(self.unexpected("end of input"));
        }
        Ok(g)
    }

    fn err_at(&self, pos: usize, message: String) -> ParseError {
        let t = &self.toks[pos.min(self.toks.len() - 1)];
        ParseError { line: t.line, col: t.col, message }
    }

    /// `%v` (a defined value) or `_` (an absent optional input).
    fn operand(&mut self, g: &Graph) -> R<Option<Value>> {
        if self.is_keyword("_") {
            self.next();
            return Ok(None);
        }
        let at = self.pos;
        let name = self.value_name()?;
        g.value_by_name(&name)
            .map(Some)
            .ok_or_else(|| self.err_at(at, format!("value %{name} is not defined before use")))
    }

    fn statement(&mut self, g: &mut Graph) -> R<()> {
        let start = self.pos;
        let mut outputs = Vec::new();
        if matches!(self.peek(), Tok::Value(_)) {
            loop {
                outputs.push(self.value_name()?);
                if !self.eat(',') {
                    break;
                }
            }
            self.expect('=')?;
        }
        let at = self.pos;
        let op_name = self.ident("an op name")?;
        let kind = OpKind::from_name(&op_name).ok_or_else(|| self.err_at(at, format!("unknown op '{op_name}'")))?;
        let mut inputs = Vec::new();
        if self.eat('(') && !self.eat(')') {
            loop {
                inputs.push(self.operand(g)?);
                if self.eat(')') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let mut attrs = Attrs::new();
        if self.eat('{') && !self.eat('}') {
            loop {
                let at = self.pos;
                let key = match self.next() {
                    Tok::Ident(k) | Tok::Str(k) => k,
                    _ => {
                        self.pos = at;
                        return Err(self.unexpected("an attribute name"));
                    }
                };
                self.expect('=')?;
                let value = self.attr()?;
                if attrs.insert(key.clone(), value).is_some() {
                    return Err(self.err_at(at, format!("attribute '{key}' is given twice")));
                }
                if self.eat('}') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let mut types = Vec::new();
        if self.eat(':') {
            loop {
                types.push(self.tensor_type()?);
                if !self.eat(',') {
                    break;
                }
            }
        }
        if types.len() != outputs.len() {
            return Err(self.err_at(start, format!("{} outputs but {} types", outputs.len(), types.len())));
        }
        let loc = self.loc()?;
        let node_name = loc.unwrap_or_else(|| outputs.first().cloned().unwrap_or_default());
        let infos = outputs.into_iter().zip(types).map(|(n, t)| ValueInfo::new(n, t)).collect();
        let op = Op { kind, attrs };
        g.add_node(node_name, op, &inputs, infos).map_err(|e| self.err_at(start, e.to_string()))?;
        Ok(())
    }

    fn attr(&mut self) -> R<Attr> {
        match self.peek().clone() {
            Tok::Int(s) => {
                let v = s.parse::<i64>().map_err(|_| self.err_here(format!("integer {s} is out of range")))?;
                self.next();
                Ok(Attr::Int(v))
            }
            Tok::Hex(v) => {
                self.next();
                Ok(Attr::Int(v as i64))
            }
            Tok::Float(_) => Ok(Attr::Float(self.float32()?)),
            Tok::Str(s) => {
                self.next();
                Ok(Attr::Str(s))
            }
            Tok::Punct('[') => self.list(None),
            Tok::Ident(w) => match w.as_str() {
                "inf" | "nan" => Ok(Attr::Float(self.float32()?)),
                "ints" | "floats" | "strs" if *self.peek_at(1) == Tok::Punct('[') => {
                    self.next();
                    self.list(Some(w))
                }
                "dense" | "dense_resource" => Ok(Attr::Tensor(self.tensor()?)),
                _ => Ok(Attr::DType(self.dtype()?)),
            },
            _ => Err(self.unexpected("an attribute value")),
        }
    }

    fn float32(&mut self) -> R<f32> {
        let text = match self.next() {
            Tok::Float(s) | Tok::Int(s) => s,
            Tok::Ident(w) if w == "inf" => return Ok(f32::INFINITY),
            Tok::Ident(w) if w == "nan" => return Ok(f32::from_bits(F32_NAN)),
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a float"));
            }
        };
        text.parse::<f32>().map_err(|_| {
            self.pos -= 1;
            self.err_here(format!("malformed float {text}"))
        })
    }

    fn list(&mut self, kind: Option<String>) -> R<Attr> {
        self.expect('[')?;
        let mut items: Vec<Attr> = Vec::new();
        if !self.eat(']') {
            loop {
                items.push(match self.peek() {
                    Tok::Int(_) | Tok::Float(_) | Tok::Str(_) | Tok::Hex(_) => self.attr()?,
                    Tok::Ident(w) if w == "inf" || w == "nan" => self.attr()?,
                    _ => return Err(self.unexpected("a list element")),
                });
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let kind = kind.unwrap_or_else(|| {
            match items.iter().find(|a| !matches!(a, Attr::Int(_))) {
                Some(Attr::Str(_)) => "strs",
                Some(_) => "floats",
                None => "ints",
            }
            .to_string()
        });
        let bad = || self.err_here(format!("list elements do not match a {kind} list"));
        Ok(match kind.as_str() {
            "ints" => Attr::Ints(
                items
                    .iter()
                    .map(|a| if let Attr::Int(v) = a { Some(*v) } else { None })
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?,
            ),
            "floats" => Attr::Floats(
                items
                    .iter()
                    .map(|a| match a {
                        Attr::Float(v) => Some(*v),
                        Attr::Int(v) => Some(*v as f32),
                        _ => None,
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?,
            ),
            _ => Attr::Strs(
                items
                    .into_iter()
                    .map(|a| if let Attr::Str(s) = a { Some(s) } else { None })
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?,
            ),
        })
    }

    /// `dense<T[dims] [values]>`, `dense<T[dims], digest "..">` or `dense_resource<T[dims], "key">`.
    fn tensor(&mut self) -> R<Tensor> {
        let resource = self.ident("'dense'")? == "dense_resource";
        self.expect('<')?;
        let dtype = self.dtype()?;
        self.expect('[')?;
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                let d = self.uint("a dimension")?;
                dims.push(usize::try_from(d).map_err(|_| self.err_here("dimension too large"))?);
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let byte_len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bits()))
            .map(|bits| bits.div_ceil(8));
        let tensor = if resource {
            self.expect(',')?;
            let at = self.pos;
            let key = self.string("a quoted resource key")?;
            let data =
                (self.resolve)(&key).ok_or_else(|| self.err_at(at, format!("resource \"{key}\" is not available")))?;
            if byte_len != Some(data.len()) {
                return Err(self.err_at(
                    at,
                    format!("resource \"{key}\" has {} bytes, which does not fit {dtype}{dims:?}", data.len()),
                ));
            }
            Tensor { dtype, dims, data: TensorData::Bytes(data) }
        } else if self.eat(',') {
            self.keyword("digest")?;
            let digest = self.string("a quoted digest")?;
            Tensor { dtype, dims, data: TensorData::Elided { digest } }
        } else {
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let data = self.values(dtype, numel)?;
            Tensor { dtype, dims, data: TensorData::Bytes(Bytes::from(data)) }
        };
        self.expect('>')?;
        Ok(tensor)
    }

    /// `[v, v, ...]` for `numel` elements of `dtype`, encoded little-endian.
    fn values(&mut self, dtype: DType, numel: Option<usize>) -> R<Vec<u8>> {
        let start = self.pos;
        self.expect('[')?;
        let mut out = Vec::new();
        let mut nibbles = Vec::new();
        let mut count = 0usize;
        if !self.eat(']') {
            loop {
                count += 1;
                if numel.is_none_or(|n| count > n) {
                    return Err(self.err_here("more values than the shape holds"));
                }
                self.element(dtype, &mut out, &mut nibbles)?;
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        if Some(count) != numel {
            return Err(self.err_at(start, format!("{count} values for a shape of {} elements", numel.unwrap_or(0))));
        }
        if matches!(dtype, DType::I4 | DType::U4) {
            out = pack_nibbles(nibbles);
        }
        Ok(out)
    }

    fn element(&mut self, dtype: DType, out: &mut Vec<u8>, nibbles: &mut Vec<i64>) -> R<()> {
        let tok = self.peek().clone();
        if dtype.is_float() {
            if let Tok::Hex(bits) = tok {
                let width = dtype.bits();
                if width < 64 && bits >> width != 0 {
                    return Err(self.err_here(format!("0x{bits:x} does not fit {dtype}")));
                }
                self.next();
                out.extend_from_slice(&bits.to_le_bytes()[..width / 8]);
                return Ok(());
            }
            let nan = matches!(&tok, Tok::Ident(w) if w == "nan");
            match dtype {
                DType::F64 => {
                    let v = if nan {
                        self.next();
                        f64::from_bits(F64_NAN)
                    } else {
                        self.float64()?
                    };
                    out.extend_from_slice(&v.to_le_bytes());
                }
                _ => {
                    let v = self.float32()?;
                    match dtype {
                        DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                        DType::F16 => {
                            let bits = if nan { F16_NAN } else { half::f16::from_f32(v).to_bits() };
                            out.extend_from_slice(&bits.to_le_bytes());
                        }
                        DType::BF16 => {
                            let bits = if nan { BF16_NAN } else { half::bf16::from_f32(v).to_bits() };
                            out.extend_from_slice(&bits.to_le_bytes());
                        }
                        _ => out.push(if nan { F8_NAN } else { f32_to_f8e4m3(v) }),
                    }
                }
            }
            return Ok(());
        }
        let v: i128 = match tok {
            Tok::Int(s) => s.parse().map_err(|_| self.err_here(format!("integer {s} is out of range")))?,
            Tok::Ident(w) if dtype == DType::Bool && (w == "true" || w == "false") => (w == "true") as i128,
            _ => return Err(self.unexpected(&format!("a {dtype} value"))),
        };
        let (lo, hi): (i128, i128) = match dtype {
            DType::Bool => (0, 255),
            DType::U64 => (0, u64::MAX as i128),
            d => d.int_range().map(|(a, b)| (a as i128, b as i128)).unwrap_or((0, 0)),
        };
        if v < lo || v > hi {
            return Err(self.err_here(format!("{v} is out of range for {dtype}")));
        }
        self.next();
        let bytes = (v as u128).to_le_bytes();
        match dtype {
            DType::I4 | DType::U4 => nibbles.push(v as i64),
            d => out.extend_from_slice(&bytes[..d.bits() / 8]),
        }
        Ok(())
    }

    fn float64(&mut self) -> R<f64> {
        let text = match self.next() {
            Tok::Float(s) | Tok::Int(s) => s,
            Tok::Ident(w) if w == "inf" => return Ok(f64::INFINITY),
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a float"));
            }
        };
        text.parse::<f64>().map_err(|_| {
            self.pos -= 1;
            self.err_here(format!("malformed float {text}"))
        })
    }
}

pub fn parse(text: &str, resolve: &mut Resolver<'_>) -> Result<Graph, ParseError> {
    let toks = lex(text)?;
    let mut p = Parser { toks, pos: 0, resolve };
    p.graph()
}
