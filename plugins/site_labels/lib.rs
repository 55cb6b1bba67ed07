//! site-labels: renames or merges classes for this site, and drops predictions under a per-camera
//! threshold (edgefleet plugin ABI 1, docs/plugins.md). Rust's standard library only, no crates, so
//! Debian's rustc with libstd-rust-dev-wasm32 builds it:
//!
//!     /usr/bin/rustc --edition 2021 --target wasm32-wasi --crate-type cdylib -C opt-level=s -C lto \
//!         -C strip=symbols -o site-labels.wasm lib.rs      (as scripts/plugins.sh does)
//!
//! Config (strings):
//!   rename               "old=new;old2=new": exact labels; two olds to one new merge them (scores
//!                        summed, the first's index kept, classes sorted again by score)
//!   min_score            drop a prediction whose top-1 score (after merging) is under this (default 0)
//!   min_score.<camera>   the same for one camera, over the default
//! Answers: nothing changed and above the threshold: keep (0); renamed: replace; under: drop.

use std::alloc::{alloc, Layout};
use std::collections::HashMap;

#[link(wasm_import_module = "edgefleet")]
extern "C" {
    #[link_name = "log"]
    fn host_log(level: i32, ptr: *const u8, len: i32);
}

const ERROR: i32 = 40;
const ABI_VERSION: i32 = 1;

fn log_error(text: &str) {
    // SAFETY: the host reads `len` bytes at `ptr`, which stay alive for the call.
    unsafe { host_log(ERROR, text.as_ptr(), text.len() as i32) }
}

/// A bounded JSON reader and writer: a whole document into a tree, refusing depth over MAX_DEPTH and
/// anything that is not JSON, so a broken input is an error, never a panic or a runaway.
mod json {
    pub const MAX_DEPTH: usize = 32;

    pub enum Value {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Value>),
        Obj(Vec<(String, Value)>),
    }

    impl Value {
        /// The first member named `key` of an object.
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }
        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Str(s) => Some(s),
                _ => None,
            }
        }
        pub fn as_f64(&self) -> Option<f64> {
            match self {
                Value::Num(n) => Some(*n),
                _ => None,
            }
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Value, &'static str> {
        let mut parser = Parser { s: bytes, i: 0 };
        let value = parser.value(0)?;
        parser.ws();
        if parser.i != bytes.len() {
            return Err("bytes after the JSON value");
        }
        Ok(value)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl<'a> Parser<'a> {
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }

        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }

        fn eat(&mut self, c: u8) -> Result<(), &'static str> {
            self.ws();
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err("unexpected character")
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value, &'static str> {
            if depth > MAX_DEPTH {
                return Err("nested too deep");
            }
            self.ws();
            match self.peek().ok_or("unexpected end")? {
                b'{' => {
                    self.i += 1;
                    let mut members = Vec::new();
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(Value::Obj(members));
                    }
                    loop {
                        self.ws();
                        let key = self.string()?;
                        self.eat(b':')?;
                        members.push((key, self.value(depth + 1)?));
                        self.ws();
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Obj(members));
                            }
                            _ => return Err("expected ',' or '}'"),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        return Ok(Value::Arr(items));
                    }
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Arr(items));
                            }
                            _ => return Err("expected ',' or ']'"),
                        }
                    }
                }
                b'"' => Ok(Value::Str(self.string()?)),
                b't' => self.literal(b"true", Value::Bool(true)),
                b'f' => self.literal(b"false", Value::Bool(false)),
                b'n' => self.literal(b"null", Value::Null),
                _ => self.number(),
            }
        }

        fn literal(&mut self, word: &[u8], value: Value) -> Result<Value, &'static str> {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                Ok(value)
            } else {
                Err("unknown literal")
            }
        }

        fn number(&mut self) -> Result<Value, &'static str> {
            let start = self.i;
            if self.peek() == Some(b'-') {
                self.i += 1;
            }
            let digits = |p: &mut Self| {
                let from = p.i;
                while p.peek().map_or(false, |c| c.is_ascii_digit()) {
                    p.i += 1;
                }
                p.i > from
            };
            if !digits(self) {
                return Err("not a number");
            }
            if self.peek() == Some(b'.') {
                self.i += 1;
                if !digits(self) {
                    return Err("no digits after '.'");
                }
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.i += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.i += 1;
                }
                if !digits(self) {
                    return Err("no digits in the exponent");
                }
            }
            // The bytes checked above are ASCII, so this is valid UTF-8.
            let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "not a number")?;
            match text.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(Value::Num(n)),
                _ => Err("number out of range"),
            }
        }

        fn hex4(&mut self) -> Result<u32, &'static str> {
            let digits = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
            let text = std::str::from_utf8(digits).map_err(|_| "bad \\u escape")?;
            let code = u32::from_str_radix(text, 16).map_err(|_| "bad \\u escape")?;
            self.i += 4;
            Ok(code)
        }

        fn string(&mut self) -> Result<String, &'static str> {
            if self.peek() != Some(b'"') {
                return Err("expected a string");
            }
            self.i += 1;
            let mut out: Vec<u8> = Vec::new();
            loop {
                let c = self.peek().ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let e = self.peek().ok_or("unterminated string")?;
                        self.i += 1;
                        let ch = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let hi = self.hex4()?;
                                let code = if (0xD800..0xDC00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    if (0xDC00..0xE000).contains(&lo) {
                                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                    } else {
                                        0xFFFD
                                    }
                                } else {
                                    hi
                                };
                                // A lone surrogate is not a character: the replacement one stands in.
                                char::from_u32(code).unwrap_or('\u{FFFD}')
                            }
                            _ => return Err("bad escape"),
                        };
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    0..=0x1f => return Err("control character in a string"),
                    _ => out.push(c),
                }
            }
            String::from_utf8(out).map_err(|_| "string is not UTF-8")
        }
    }

    /// `text` as a quoted JSON string.
    pub fn write_str(out: &mut Vec<u8>, text: &str) {
        out.push(b'"');
        for c in text.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out.push(b'"');
    }
}

struct Class {
    index: i64,
    label: String,
    score: f64,
}

struct Rules {
    rename: Vec<(String, String)>,
    min_score: f64,
    per_camera: Vec<(String, f64)>,
}

// One instance runs on one thread (docs/plugins.md): plain statics, reached only through these exports.
static mut RULES: Option<Rules> = None;
static mut RESULT: Vec<u8> = Vec::new();

fn parse_score(key: &str, text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(score) if (0.0..=1.0).contains(&score) => Ok(score),
        _ => Err(format!("site-labels: '{}' must be a number from 0 to 1, not {:?}", key, text)),
    }
}

fn parse_rules(config: &json::Value) -> Result<Rules, String> {
    let members = match config {
        json::Value::Obj(members) => members,
        _ => return Err("site-labels: the config is not a JSON object".into()),
    };
    let mut rules = Rules { rename: Vec::new(), min_score: 0.0, per_camera: Vec::new() };
    for (key, value) in members {
        let text = value.as_str().ok_or_else(|| format!("site-labels: '{}' is not a string", key))?;
        if key == "rename" {
            for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let (old, new) = pair
                    .split_once('=')
                    .map(|(o, n)| (o.trim(), n.trim()))
                    .filter(|(o, n)| !o.is_empty() && !n.is_empty())
                    .ok_or_else(|| format!("site-labels: rename {:?} is not old=new", pair))?;
                rules.rename.push((old.to_string(), new.to_string()));
            }
        } else if key == "min_score" {
            rules.min_score = parse_score(key, text)?;
        } else if let Some(camera) = key.strip_prefix("min_score.").filter(|c| !c.is_empty()) {
            rules.per_camera.push((camera.to_string(), parse_score(key, text)?));
        } else {
            // A typo in a site's config would otherwise be a rule silently not applied.
            return Err(format!("site-labels: unknown config key {:?}", key));
        }
    }
    Ok(rules)
}

/// The prediction's classes after renaming and merging, highest score first; and whether any changed.
fn relabel<'a>(rules: &'a Rules, top: &'a [json::Value]) -> Option<(Vec<Class>, bool)> {
    let mut out: Vec<Class> = Vec::with_capacity(top.len());
    // Where each label already is in `out`: a prediction may carry 1000 classes.
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(top.len());
    let mut changed = false;
    for item in top {
        let index = item.get("index")?.as_f64()?;
        if index.fract() != 0.0 {
            return None;
        }
        let label = item.get("label")?.as_str()?;
        let score = item.get("score")?.as_f64()?;
        let label = match rules.rename.iter().find(|(old, _)| old == label) {
            Some((_, new)) => {
                changed = true;
                new.as_str()
            }
            None => label,
        };
        match seen.get(label) {
            Some(&at) => out[at].score += score,
            None => {
                seen.insert(label, out.len());
                out.push(Class { index: index as i64, label: label.to_string(), score });
            }
        }
    }
    // Stable, so equal scores keep the model's order.
    out.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(std::cmp::Ordering::Equal));
    Some((out, changed))
}

fn write_replace(out: &mut Vec<u8>, classes: &[Class]) {
    out.clear();
    out.extend_from_slice(b"{\"action\":\"replace\",\"top\":[");
    for (k, class) in classes.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"index\":{},\"label\":", class.index).as_bytes());
        json::write_str(out, &class.label);
        // Rust prints an f64 in the fewest digits that read back the same; the caller checked it is finite.
        out.extend_from_slice(format!(",\"score\":{:?}}}", class.score).as_bytes());
    }
    out.extend_from_slice(b"]}");
}

fn packed(out: &[u8]) -> i64 {
    ((out.as_ptr() as u32 as i64) << 32) | out.len() as u32 as i64
}

#[no_mangle]
pub extern "C" fn edgefleet_abi_version() -> i32 {
    ABI_VERSION
}

/// The host's input buffer: from the allocator (never a static one), left to the host for good.
#[no_mangle]
pub extern "C" fn edgefleet_alloc(size: i32) -> i32 {
    if size < 0 {
        return 0;
    }
    match Layout::from_size_align(size.max(1) as usize, 8) {
        // SAFETY: a non-zero size; a null answer (out of memory) goes back to the host as 0.
        Ok(layout) => unsafe { alloc(layout) as i32 },
        Err(_) => 0,
    }
}

/// # Safety
/// The host passes `len` readable bytes at `ptr` (docs/plugins.md).
#[no_mangle]
pub unsafe extern "C" fn edgefleet_init(ptr: *const u8, len: i32) -> i32 {
    let bytes = std::slice::from_raw_parts(ptr, len.max(0) as usize);
    let parsed = json::parse(bytes).map_err(|e| format!("site-labels: the config is not JSON: {}", e));
    match parsed.and_then(|config| parse_rules(&config)) {
        Ok(rules) => {
            RULES = Some(rules);
            0
        }
        Err(message) => {
            log_error(&message);
            1
        }
    }
}

/// # Safety
/// The host passes `len` readable bytes at `ptr` (docs/plugins.md).
#[no_mangle]
pub unsafe extern "C" fn edgefleet_on_prediction(ptr: *const u8, len: i32) -> i64 {
    let rules = RULES.get_or_insert_with(|| Rules { rename: Vec::new(), min_score: 0.0, per_camera: Vec::new() });
    let bytes = std::slice::from_raw_parts(ptr, len.max(0) as usize);
    let prediction = match json::parse(bytes) {
        Ok(value) => value,
        Err(_) => return -1,
    };
    let camera = prediction.get("camera").and_then(json::Value::as_str).unwrap_or("");
    let top = match prediction.get("top") {
        Some(json::Value::Arr(items)) => items,
        _ => return -1,
    };
    let (classes, changed) = match relabel(rules, top) {
        Some(relabelled) => relabelled,
        None => return -1,
    };
    let threshold = rules.per_camera.iter().find(|(c, _)| c == camera).map_or(rules.min_score, |(_, s)| *s);
    let out = &mut RESULT;
    if classes.first().map_or(false, |best| best.score < threshold) {
        out.clear();
        out.extend_from_slice(b"{\"action\":\"drop\"}");
        return packed(out);
    }
    if !changed {
        return 0;
    }
    if classes.iter().any(|c| !c.score.is_finite()) {
        return -1;
    }
    write_replace(out, &classes);
    packed(out)
}
