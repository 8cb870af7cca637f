//! Tokens of the `.qir` text format, each with its 1-based line and column.

use super::ParseError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// `%name` or `%"quoted name"`.
    Value(String),
    /// `@name` or `@"quoted name"`.
    Global(String),
    /// A bare word: `[A-Za-z_][A-Za-z0-9_]*` (op names, dtypes, keywords, attribute names, dim symbols).
    Ident(String),
    /// An integer literal, kept as text so that each use checks its own range.
    Int(String),
    /// A float literal (has `.` or an exponent), or `-inf`.
    Float(String),
    /// `0x...`: raw bits (NaN payloads in dense tensors).
    Hex(u64),
    Str(String),
    Punct(char),
    Arrow,
    Eof,
}

impl Tok {
    pub fn describe(&self) -> String {
        match self {
            Tok::Value(n) => format!("value %{n}"),
            Tok::Global(n) => format!("@{n}"),
            Tok::Ident(n) => format!("'{n}'"),
            Tok::Int(n) | Tok::Float(n) => format!("number {n}"),
            Tok::Hex(n) => format!("0x{n:x}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Punct(c) => format!("'{c}'"),
            Tok::Arrow => "'->'".to_string(),
            Tok::Eof => "end of input".to_string(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    pub line: usize,
    pub col: usize,
}

/// Characters allowed in an unquoted `%` or `@` name (a `:` only between two such characters).
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$' | '/' | '-')
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    col: usize,
}

impl Lexer<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn err(&self, line: usize, col: usize, message: impl Into<String>) -> ParseError {
        ParseError { line, col, message: message.into() }
    }

    fn take_while(&mut self, out: &mut String, f: impl Fn(char) -> bool) {
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            out.push(c);
            self.bump();
        }
    }

    fn string(&mut self, line: usize, col: usize) -> Result<String, ParseError> {
        // The opening quote is already consumed.
        let mut s = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return Err(self.err(line, col, "unterminated string")),
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('u') => {
                        if self.bump() != Some('{') {
                            return Err(self.err(self.line, self.col, "expected '{' after \\u"));
                        }
                        let mut hex = String::new();
                        self.take_while(&mut hex, |c| c.is_ascii_hexdigit());
                        if self.bump() != Some('}') || hex.is_empty() || hex.len() > 6 {
                            return Err(self.err(self.line, self.col, "malformed \\u{...} escape"));
                        }
                        let code = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                        s.push(code.ok_or_else(|| self.err(self.line, self.col, "\\u escape is not a character"))?);
                    }
                    _ => return Err(self.err(self.line, self.col, "unknown escape in string")),
                },
                Some(c) => s.push(c),
            }
        }
    }

    /// A `%`/`@` name after its sigil: quoted, or bare name characters with interior colons.
    fn name(&mut self, line: usize, col: usize) -> Result<String, ParseError> {
        if self.peek() == Some('"') {
            self.bump();
            return self.string(line, col);
        }
        let mut s = String::new();
        loop {
            match self.peek() {
                Some(c) if is_name_char(c) => {
                    s.push(c);
                    self.bump();
                }
                Some(':') => {
                    let mut ahead = self.chars.clone();
                    ahead.next();
                    if !ahead.next().is_some_and(|c| is_name_char(c) || c == ':') || s.is_empty() {
                        break;
                    }
                    s.push(':');
                    self.bump();
                }
                _ => break,
            }
        }
        if s.is_empty() {
            return Err(self.err(line, col, "expected a name after the sigil"));
        }
        Ok(s)
    }

    fn number(&mut self, line: usize, col: usize, negative: bool) -> Result<Tok, ParseError> {
        let mut s = String::new();
        if negative {
            s.push('-');
        }
        if self.peek() == Some('0') {
            let mut ahead = self.chars.clone();
            ahead.next();
            if ahead.next() == Some('x') && !negative {
                self.bump();
                self.bump();
                let mut hex = String::new();
                self.take_while(&mut hex, |c| c.is_ascii_hexdigit());
                return u64::from_str_radix(&hex, 16)
                    .map(Tok::Hex)
                    .map_err(|_| self.err(line, col, "malformed hex literal"));
            }
        }
        self.take_while(&mut s, |c| c.is_ascii_digit());
        let mut float = false;
        if self.peek() == Some('.') {
            float = true;
            s.push('.');
            self.bump();
            self.take_while(&mut s, |c| c.is_ascii_digit());
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            float = true;
            s.push('e');
            self.bump();
            if let Some(c @ ('+' | '-')) = self.peek() {
                s.push(c);
                self.bump();
            }
            let before = s.len();
            self.take_while(&mut s, |c| c.is_ascii_digit());
            if s.len() == before {
                return Err(self.err(line, col, "malformed exponent"));
            }
        }
        if self.peek().is_some_and(is_ident_char) {
            return Err(self.err(self.line, self.col, "unexpected character after number"));
        }
        Ok(if float { Tok::Float(s) } else { Tok::Int(s) })
    }
}

pub fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut lx = Lexer { chars: text.chars().peekable(), line: 1, col: 1 };
    let mut out = Vec::new();
    loop {
        let (line, col) = (lx.line, lx.col);
        let Some(c) = lx.peek() else {
            out.push(Token { tok: Tok::Eof, line, col });
            return Ok(out);
        };
        let tok = match c {
            c if c.is_whitespace() => {
                lx.bump();
                continue;
            }
            '/' => {
                lx.bump();
                if lx.peek() != Some('/') {
                    return Err(lx.err(line, col, "unexpected '/'"));
                }
                while lx.peek().is_some_and(|c| c != '\n') {
                    lx.bump();
                }
                continue;
            }
            '%' | '@' => {
                lx.bump();
                let name = lx.name(line, col)?;
                if c == '%' {
                    Tok::Value(name)
                } else {
                    Tok::Global(name)
                }
            }
            '"' => {
                lx.bump();
                Tok::Str(lx.string(line, col)?)
            }
            '-' => {
                lx.bump();
                match lx.peek() {
                    Some('>') => {
                        lx.bump();
                        Tok::Arrow
                    }
                    Some(d) if d.is_ascii_digit() => lx.number(line, col, true)?,
                    Some('i') => {
                        let mut word = String::new();
                        lx.take_while(&mut word, is_ident_char);
                        if word != "inf" {
                            return Err(lx.err(line, col, format!("unexpected '-{word}'")));
                        }
                        Tok::Float("-inf".into())
                    }
                    _ => return Err(lx.err(line, col, "unexpected '-'")),
                }
            }
            d if d.is_ascii_digit() => lx.number(line, col, false)?,
            c if is_ident_start(c) => {
                let mut word = String::new();
                lx.take_while(&mut word, is_ident_char);
                Tok::Ident(word)
            }
            '(' | ')' | '{' | '}' | '[' | ']' | '<' | '>' | ',' | '=' | ':' | '*' | '?' => {
                lx.bump();
                Tok::Punct(c)
            }
            other => return Err(lx.err(line, col, format!("unexpected character {other:?}"))),
        };
        out.push(Token { tok, line, col });
    }
}
