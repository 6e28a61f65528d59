//! HTML by hand: one escaping function every value goes through, and the
//! page frame (inline CSS, no script: the Content-Security-Policy forbids
//! any, so an escaping slip still runs nothing).

use std::fmt::Write;

/// `value` safe inside an element and inside a quoted attribute.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An optional value, or a dash for "none".
pub fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => escape(v),
        _ => "&mdash;".to_string(),
    }
}

/// "42 s ago", "5 min ago", "3 h ago", "2 d ago": an operator scanning a
/// fleet wants the age, the exact time is in the title attribute.
pub fn age(seconds: Option<i64>) -> String {
    match seconds {
        None => "never".into(),
        Some(s) if s < 60 => format!("{} s ago", s.max(0)),
        Some(s) if s < 3600 => format!("{} min ago", s / 60),
        Some(s) if s < 86_400 => format!("{} h ago", s / 3600),
        Some(s) => format!("{} d ago", s / 86_400),
    }
}

/// A timestamp cell: the age, with the exact UTC time on hover.
pub fn when(rfc3339: Option<&str>, age_seconds: Option<i64>) -> String {
    match rfc3339 {
        Some(t) => format!(
            "<time datetime=\"{0}\" title=\"{0}\">{1}</time>",
            escape(t),
            age(age_seconds)
        ),
        None => "never".into(),
    }
}

/// A percentage of a fraction in 0..=1, for thresholds.
pub fn percent(fraction: f32) -> String {
    let p = f64::from(fraction) * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

const CSS: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f4f6f8}\
header{background:#173b57;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}\
header a{color:#fff;text-decoration:none;font-weight:600}\
header .who{margin-left:auto;display:flex;gap:10px;align-items:center}\
header form{margin:0}\
main{padding:16px 20px;max-width:1200px}\
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}\
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:12px}\
th,td{border:1px solid #d5dde5;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#e8eef3;font-weight:600}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
tr.revoked td{color:#8a949e;text-decoration:line-through}\
code{font-size:12px}\
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;background:#dde3e8}\
.state-running,.state-installed{background:#d4f0dc;color:#155d2b}\
.state-paused,.state-refused,.state-failed{background:#fbe0dc;color:#8a1f11}\
.state-rolling_back,.state-rollback_offered{background:#fff0c2;color:#6b4c00}\
.state-done,.state-rolled_back{background:#dfe7f5;color:#1f3f73}\
.state-offered{background:#e9e4f7;color:#3d2a7a}\
.warn{background:#fbe0dc;border:1px solid #e6a79c;padding:8px 12px;margin:8px 0}\
.error{color:#8a1f11;font-weight:600}\
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;background:#fff;padding:10px;border:1px solid #d5dde5}\
dt{font-weight:600}dd{margin:0}\
progress{width:120px}\
form.login{background:#fff;border:1px solid #d5dde5;padding:20px;max-width:320px;display:grid;gap:8px}\
form.login input{font:inherit;padding:4px}\
button{font:inherit;cursor:pointer}\
footer{color:#6b7580;font-size:12px;padding:0 20px 20px}";

/// Seconds between the status pages' own refreshes.
pub const REFRESH_SECONDS: u32 = 10;

/// A whole page. `operator` is who is logged in (None on the login page);
/// `body` is already-escaped HTML.
pub fn page(title: &str, operator: Option<&str>, refresh: bool, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    out.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    if refresh {
        let _ = write!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
        );
    }
    let _ = write!(
        out,
        "<title>{} · Dermascope fleet</title><style>{CSS}</style></head><body><header>\
         <a href=\"/fleet\">Dermascope fleet</a>",
        escape(title)
    );
    if let Some(name) = operator {
        let _ = write!(
            out,
            "<a href=\"/fleet\">Devices</a><a href=\"/fleet/rollouts\">Rollouts</a>\
             <span class=\"who\"><span id=\"operator\">{}</span>\
             <form method=\"post\" action=\"/fleet/logout\"><button type=\"submit\">Log out</button></form></span>",
            escape(name)
        );
    }
    out.push_str("</header><main>");
    out.push_str(body);
    out.push_str("</main>");
    if refresh {
        let _ = write!(
            out,
            "<footer>This page reloads itself every {REFRESH_SECONDS} s.</footer>"
        );
    }
    out.push_str("</body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("Clinique Nord é"), "Clinique Nord é");
    }

    #[test]
    fn ages_read_as_a_person_says_them() {
        assert_eq!(age(None), "never");
        assert_eq!(age(Some(5)), "5 s ago");
        assert_eq!(age(Some(-2)), "0 s ago");
        assert_eq!(age(Some(150)), "2 min ago");
        assert_eq!(age(Some(7200)), "2 h ago");
        assert_eq!(age(Some(3 * 86_400)), "3 d ago");
    }

    #[test]
    fn thresholds_print_as_percentages() {
        assert_eq!(percent(0.9), "90%");
        assert_eq!(percent(0.25), "25%");
        assert_eq!(percent(1.0), "100%");
        assert_eq!(percent(0.125), "12.5%");
    }

    #[test]
    fn the_operator_name_is_escaped_in_the_frame() {
        let html = page("<t>", Some("a<b"), true, "");
        assert!(html.contains("a&lt;b") && !html.contains("a<b"));
        assert!(html.contains("&lt;t&gt;"));
        assert!(html.contains("http-equiv=\"refresh\""));
    }
}
