//! Masking secrets in command lines before anything leaves the node.
//!
//! Covered: `--password=x`, `--password x`, `-p x` is left alone (too many
//! tools use `-p` for ports), `PGPASSWORD=x`-style assignments, credentials
//! in URLs (`scheme://user:secret@host`), secret query parameters
//! (`?token=x`), and `Authorization: Bearer x` / `Basic x` header values.

/// What replaces a secret.
pub const MASK: &str = "****";

use crate::secrets::{is_secret, is_secret_name, mask_inline};

/// Masks `user:secret@` in every URL of `arg`.
fn mask_url_credentials(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find(['/', '?', '#', ' ']).unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(atsign), Some(colon)) if colon < atsign => {
                out.push_str(&authority[..=colon]);
                out.push_str(MASK);
                out.push_str(&authority[atsign..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Masks secret-named query parameters (`?token=x&a=b`).
fn mask_query(arg: &str) -> String {
    let Some(q) = arg.find('?') else {
        return arg.to_owned();
    };
    let (base, query) = arg.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if is_secret_name(k) => format!("{k}={MASK}"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{base}{}", parts.join("&"))
}

/// Returns `argv` with secrets replaced by [`MASK`].
pub fn mask_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    // The option whose value comes next.
    let mut option: Option<&str> = None;
    for arg in argv {
        if let Some(name) = option.take() {
            out.push(if is_secret(name, arg) {
                MASK.to_owned()
            } else {
                arg.clone()
            });
            continue;
        }
        let lower = arg.to_ascii_lowercase();
        if let Some(i) = lower.find("bearer ").or_else(|| lower.find("basic ")) {
            let word = if lower[i..].starts_with("bearer ") {
                7
            } else {
                6
            };
            out.push(format!("{}{MASK}", &arg[..i + word]));
            continue;
        }
        if let Some((name, value)) = arg.split_once('=') {
            let plain_name = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if plain_name && is_secret_name(name) {
                out.push(if is_secret(name, value) {
                    format!("{name}={MASK}")
                } else {
                    arg.clone()
                });
                continue;
            }
        }
        if arg.starts_with("--") && is_secret_name(arg) {
            out.push(arg.clone());
            option = Some(arg);
            continue;
        }
        // Anything else: credentials in URLs and queries, and `name: value`
        // or `name=value` inside the argument (a sed expression rewriting
        // a password in a config file).
        let plain = mask_query(&mask_url_credentials(arg));
        out.push(mask_inline(&plain, false, &mut |_| MASK.to_owned()).0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(args: &[&str]) -> Vec<String> {
        mask_argv(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_with_values() {
        assert_eq!(
            m(&["mysql", "--password=hunter2", "-u", "app"]),
            ["mysql", "--password=****", "-u", "app"]
        );
        assert_eq!(
            m(&["tool", "--password", "hunter2", "next"]),
            ["tool", "--password", "****", "next"]
        );
        assert_eq!(
            m(&["tool", "--api-key=abc", "--db-password", "x"]),
            ["tool", "--api-key=****", "--db-password", "****"]
        );
        assert_eq!(
            m(&["tool", "--auth-token=abc"]),
            ["tool", "--auth-token=****"]
        );
    }

    #[test]
    fn environment_assignments() {
        assert_eq!(
            m(&["env", "PGPASSWORD=s3cret", "psql"]),
            ["env", "PGPASSWORD=****", "psql"]
        );
        assert_eq!(
            m(&["env", "AWS_SECRET_ACCESS_KEY=abc", "GITHUB_TOKEN=t"]),
            ["env", "AWS_SECRET_ACCESS_KEY=****", "GITHUB_TOKEN=****"]
        );
        assert_eq!(
            m(&["env", "HOME=/root", "LANG=C"]),
            ["env", "HOME=/root", "LANG=C"]
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            m(&["psql", "postgresql://app:hunter2@db:5432/prod"]),
            ["psql", "postgresql://app:****@db:5432/prod"]
        );
        assert_eq!(
            m(&["curl", "https://api.example/v1?token=abc&page=2"]),
            ["curl", "https://api.example/v1?token=****&page=2"]
        );
        // No credentials: unchanged.
        assert_eq!(
            m(&["curl", "https://user@host/x"]),
            ["curl", "https://user@host/x"]
        );
        assert_eq!(
            m(&["curl", "http://host:8080/x"]),
            ["curl", "http://host:8080/x"]
        );
    }

    #[test]
    fn authorization_headers() {
        assert_eq!(
            m(&["curl", "-H", "Authorization: Bearer eyJabc"]),
            ["curl", "-H", "Authorization: Bearer ****"]
        );
        assert_eq!(
            m(&["curl", "-H", "authorization: basic dXNlcjpw"]),
            ["curl", "-H", "authorization: basic ****"]
        );
    }

    #[test]
    fn secrets_inside_an_argument() {
        assert_eq!(
            m(&[
                "sed",
                "-i",
                "s/password: s3cret-OLD-7f3a/password: s3cret-NEW-9c1d/",
                "app.yaml"
            ]),
            ["sed", "-i", "s/password: ****/password: ****/", "app.yaml"]
        );
        assert_eq!(
            m(&["python3", "-c", "open('x').write('token=abc123')"]),
            ["python3", "-c", "open('x').write('token=****')"]
        );
        // A key option naming a file keeps it.
        assert_eq!(
            m(&[
                "curl",
                "--key",
                "/etc/tls/client.key",
                "--cert=/etc/tls/c.pem"
            ]),
            [
                "curl",
                "--key",
                "/etc/tls/client.key",
                "--cert=/etc/tls/c.pem"
            ]
        );
    }

    #[test]
    fn ordinary_arguments_untouched() {
        let args = [
            "dw-marker-28641-exit",
            "3f0c9a1d2b4e5f6071829304a5b6c7d8",
            "sed",
            "-i",
            "s/a/b/",
            "/etc/myapp/app.conf",
            "-p",
            "5432",
            "--port=5432",
            "--passes=3",
        ];
        assert_eq!(m(&args), args);
    }
}
