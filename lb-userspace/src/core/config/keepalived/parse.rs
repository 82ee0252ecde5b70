//! keepalived.conf as a tree of statements: a keyword, its arguments and, when it opens one,
//! a block, each with the file and line it came from. `include` is followed (a glob, relative
//! to the including file's directory), as keepalived does.
//!
//! The syntax (keepalived's parser): tokens are separated by blanks; `#` and `!` begin a
//! comment; `"..."` quotes a token; `{` and `}` are tokens of their own even when written
//! against a word; a statement ends with its line, and a `{` at its end (or on the next line)
//! opens its block, which the matching `}` closes.

use std::path::{Path, PathBuf};

use super::KeepalivedError;

/// Reads config files for the parser: the file system, or memory in tests.
pub trait Loader {
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// The files a pattern names, sorted (an `include` of a glob).
    fn glob(&self, pattern: &Path) -> std::io::Result<Vec<PathBuf>>;
}

/// Where a statement was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub file: String,
    pub line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stmt {
    pub keyword: String,
    pub args: Vec<String>,
    pub block: Option<Vec<Stmt>>,
    pub at: Place,
}

impl Stmt {
    /// The statements of its block (none if it has no block).
    pub fn children(&self) -> &[Stmt] {
        self.block.as_deref().unwrap_or_default()
    }

    /// `keyword arg arg`, as written (for messages).
    pub fn text(&self) -> String {
        std::iter::once(self.keyword.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Word(String),
    Open,
    Close,
}

/// The tokens of one file, with their lines.
fn tokenize(text: &str, file: &str) -> Result<Vec<(Tok, usize)>, KeepalivedError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut chars = line.chars().peekable();
        let mut word = String::new();
        let flush = |word: &mut String, out: &mut Vec<(Tok, usize)>| {
            if !word.is_empty() {
                out.push((Tok::Word(std::mem::take(word)), n));
            }
        };
        while let Some(c) = chars.next() {
            match c {
                '#' | '!' if word.is_empty() => break,
                '"' => {
                    let mut quoted = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '"' {
                            closed = true;
                            break;
                        }
                        quoted.push(c);
                    }
                    if !closed {
                        return Err(KeepalivedError::new(
                            &Place {
                                file: file.to_string(),
                                line: n,
                            },
                            "\"",
                            "a quoted string is not closed on its line",
                        ));
                    }
                    word.push_str(&quoted);
                    if word.is_empty() {
                        // An empty quoted string is still an argument.
                        out.push((Tok::Word(String::new()), n));
                    }
                }
                '{' | '}' => {
                    flush(&mut word, &mut out);
                    out.push((if c == '{' { Tok::Open } else { Tok::Close }, n));
                }
                c if c.is_whitespace() => flush(&mut word, &mut out),
                c => word.push(c),
            }
        }
        flush(&mut word, &mut out);
        out.push((Tok::Word("\n".to_string()), n));
    }
    Ok(out)
}

/// Parses `path` and every file it includes into one list of top-level statements.
pub fn parse_file(loader: &dyn Loader, path: &Path) -> Result<Vec<Stmt>, KeepalivedError> {
    let mut seen = Vec::new();
    parse_into(loader, path, &mut seen, 0)
}

const MAX_INCLUDE_DEPTH: usize = 8;

fn parse_into(
    loader: &dyn Loader,
    path: &Path,
    seen: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<Vec<Stmt>, KeepalivedError> {
    let file = path.display().to_string();
    let text = loader.read(path).map_err(|e| KeepalivedError {
        at: None,
        token: file.clone(),
        message: format!("cannot read it: {e}"),
    })?;
    seen.push(path.to_path_buf());
    let toks = tokenize(&text, &file)?;
    let mut pos = 0;
    let stmts = block(&toks, &mut pos, &file, false)?;
    // Includes are spliced in where they stand, at any level keepalived allows one.
    let mut out = Vec::new();
    for s in stmts {
        out.extend(expand(loader, path, s, seen, depth)?);
    }
    Ok(out)
}

fn expand(
    loader: &dyn Loader,
    path: &Path,
    mut s: Stmt,
    seen: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<Vec<Stmt>, KeepalivedError> {
    if s.keyword != "include" {
        if let Some(children) = s.block.take() {
            let mut kids = Vec::new();
            for c in children {
                kids.extend(expand(loader, path, c, seen, depth)?);
            }
            s.block = Some(kids);
        }
        return Ok(vec![s]);
    }
    let Some(pattern) = s.args.first() else {
        return Err(KeepalivedError::new(&s.at, "include", "names no file"));
    };
    if depth >= MAX_INCLUDE_DEPTH {
        return Err(KeepalivedError::new(
            &s.at,
            "include",
            format!("includes nest deeper than {MAX_INCLUDE_DEPTH} files"),
        ));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let pattern = base.join(pattern);
    let files = loader
        .glob(&pattern)
        .map_err(|e| KeepalivedError::new(&s.at, &s.text(), format!("{e}")))?;
    let mut out = Vec::new();
    for f in files {
        if seen.contains(&f) {
            return Err(KeepalivedError::new(
                &s.at,
                &s.text(),
                format!("{} includes itself", f.display()),
            ));
        }
        out.extend(parse_into(loader, &f, seen, depth + 1)?);
        seen.pop();
    }
    Ok(out)
}

/// Statements until the end of the tokens (top level) or the `}` closing this block.
fn block(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    file: &str,
    nested: bool,
) -> Result<Vec<Stmt>, KeepalivedError> {
    let place = |line: usize| Place {
        file: file.to_string(),
        line,
    };
    let mut out: Vec<Stmt> = Vec::new();
    let mut current: Option<Stmt> = None;
    while *pos < toks.len() {
        let (tok, line) = &toks[*pos];
        *pos += 1;
        match tok {
            Tok::Word(w) if w == "\n" => {
                if let Some(s) = current.take() {
                    out.push(s);
                }
            }
            Tok::Word(w) => match current.as_mut() {
                Some(s) => s.args.push(w.clone()),
                None => {
                    current = Some(Stmt {
                        keyword: w.clone(),
                        args: Vec::new(),
                        block: None,
                        at: place(*line),
                    })
                }
            },
            Tok::Open => {
                // `{` opens the block of the statement on its line, or of the one before it
                // (written on the next line).
                let mut owner = match current.take() {
                    Some(s) => s,
                    None => match out.pop() {
                        Some(s) if s.block.is_none() => s,
                        _ => {
                            return Err(KeepalivedError::new(
                                &place(*line),
                                "{",
                                "a block opened without a keyword",
                            ))
                        }
                    },
                };
                owner.block = Some(block(toks, pos, file, true)?);
                out.push(owner);
            }
            Tok::Close => {
                if let Some(s) = current.take() {
                    out.push(s);
                }
                if !nested {
                    return Err(KeepalivedError::new(&place(*line), "}", "closes no block"));
                }
                return Ok(out);
            }
        }
    }
    if nested {
        let line = toks.last().map_or(1, |(_, l)| *l);
        return Err(KeepalivedError::new(
            &place(line),
            "{",
            "a block is not closed by the end of the file",
        ));
    }
    if let Some(s) = current.take() {
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Mem(BTreeMap<PathBuf, String>);

    impl Loader for Mem {
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }

        fn glob(&self, pattern: &Path) -> std::io::Result<Vec<PathBuf>> {
            let p = pattern.display().to_string();
            let prefix = p.trim_end_matches("*.conf");
            Ok(self
                .0
                .keys()
                .filter(|k| {
                    let k = k.display().to_string();
                    if p.ends_with("*.conf") {
                        k.starts_with(prefix) && k.ends_with(".conf")
                    } else {
                        k == p
                    }
                })
                .cloned()
                .collect())
        }
    }

    #[test]
    fn blocks_comments_quotes_and_includes() {
        let main = "! main\nglobal_defs {\n  router_id lb1 # comment\n}\nvirtual_server 10.0.0.1 80\n{\n  \
                    MISC_CHECK { misc_path \"/bin/check --x 1\" }\n}\ninclude conf.d/*.conf\n";
        let mem = Mem(BTreeMap::from([
            (PathBuf::from("/k/main.conf"), main.to_string()),
            (
                PathBuf::from("/k/conf.d/a.conf"),
                "real_thing 1\n".to_string(),
            ),
        ]));
        let stmts = parse_file(&mem, Path::new("/k/main.conf")).expect("parses");
        assert_eq!(stmts.len(), 3);
        assert_eq!(stmts[0].children()[0].text(), "router_id lb1");
        let vs = &stmts[1];
        assert_eq!(vs.text(), "virtual_server 10.0.0.1 80");
        let misc = &vs.children()[0];
        assert_eq!(misc.keyword, "MISC_CHECK");
        assert_eq!(misc.children()[0].args, vec!["/bin/check --x 1"]);
        assert_eq!(misc.at.line, 7);
        assert_eq!(stmts[2].at.to_string(), "/k/conf.d/a.conf:1");
        let e = parse_file(
            &Mem(BTreeMap::from([(
                PathBuf::from("/x"),
                "a {\n b\n".to_string(),
            )])),
            Path::new("/x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not closed"), "{e}");
        let loop_ = Mem(BTreeMap::from([(
            PathBuf::from("/l.conf"),
            "include l.conf\n".to_string(),
        )]));
        let e = parse_file(&loop_, Path::new("/l.conf")).unwrap_err();
        assert!(e.to_string().contains("includes itself"), "{e}");
    }
}
