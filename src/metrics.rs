//! Prometheus text exposition (version 0.0.4) for `GET /metrics`: each
//! part of the server writes its own families through [`Metrics`].

use std::fmt::Write;

/// Builds one exposition document. Families are written whole (HELP, TYPE,
/// then samples), as the format requires.
#[derive(Debug, Default)]
pub struct Metrics {
    text: String,
}

/// A metric's labels, as (name, value) pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, help, "counter", &[(&[], value as f64)]);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help, "gauge", &[(&[], value)]);
    }

    /// A family with labelled samples; `kind` is `counter` or `gauge`.
    pub fn family(&mut self, name: &str, help: &str, kind: &str, samples: &[(Labels<'_>, f64)]) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.text.push_str(name);
            if !labels.is_empty() {
                self.text.push('{');
                for (i, (label, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.text.push(',');
                    }
                    let _ = write!(self.text, "{label}=\"{}\"", escape(v));
                }
                self.text.push('}');
            }
            let _ = writeln!(self.text, " {value}");
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_in_the_text_format() {
        let mut m = Metrics::new();
        m.counter("fanout_upgrades_total", "WebSocket upgrades.", 3);
        m.family(
            "fanout_connections",
            "Open connections.",
            "gauge",
            &[
                (&[("listener", "public"), ("endpoint", "ws")], 2.0),
                (&[("listener", "in\"t")], 0.5),
            ],
        );
        let text = m.finish();
        assert_eq!(
            text,
            "# HELP fanout_upgrades_total WebSocket upgrades.\n# TYPE fanout_upgrades_total counter\nfanout_upgrades_total 3\n\
             # HELP fanout_connections Open connections.\n# TYPE fanout_connections gauge\n\
             fanout_connections{listener=\"public\",endpoint=\"ws\"} 2\nfanout_connections{listener=\"in\\\"t\"} 0.5\n"
        );
    }
}
