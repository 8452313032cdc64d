//! Runs a policy's own `[[tests]]` against synthesized identities.
#![warn(missing_docs)]

use super::{Action, Diagnostic, Policy};

impl Policy {
    pub(crate) fn run_selftests(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for t in &self.tests {
            for l in &t.logins {
                let d = self.check_ssh(&t.src, &t.dst, &l.login);
                if d.action != l.expect {
                    let by = match &d.rule {
                        Some(r) => format!("decided by {r}"),
                        None => "no ssh rule matched: default deny".to_string(),
                    };
                    out.push(Diagnostic {
                        file: self.file.clone(),
                        line: l.line,
                        col: l.col,
                        message: format!(
                            "test failed: {}: login as {}: expected {}, got {} ({by})",
                            t.label,
                            l.login,
                            expect_word(l.expect),
                            expect_word(d.action)
                        ),
                    });
                }
            }
            for p in &t.ports {
                let rule = self.network_rule(&t.src, &t.dst, p.port);
                let got = rule.is_some();
                if got != p.reachable {
                    let message = match rule {
                        Some(r) => {
                            format!("test failed: {}: port {}: expected unreachable, got reachable (allowed by {r})", t.label, p.port)
                        }
                        None => format!(
                            "test failed: {}: port {}: expected reachable, got unreachable (no acl or ssh rule allows it)",
                            t.label, p.port
                        ),
                    };
                    out.push(Diagnostic { file: self.file.clone(), line: p.line, col: p.col, message });
                }
            }
        }
        out
    }
}

fn expect_word(a: Action) -> &'static str {
    match a {
        Action::Accept => "accept",
        Action::Check => "check",
        Action::Reject => "deny",
    }
}
