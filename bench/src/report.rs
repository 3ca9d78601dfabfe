//! The benchmark report: one section per scenario, rendered as the
//! Markdown of `BENCHMARKS.md`.

use std::fmt::Write;

/// A target from the issue, checked against a measured figure.
#[derive(Debug, Clone)]
pub struct TargetCheck {
    /// What is measured.
    pub name: String,
    /// The measured figure, formatted.
    pub measured: String,
    /// The goal, formatted.
    pub goal: String,
    /// Whether the goal is met.
    pub met: bool,
}

/// The results of one scenario.
#[derive(Debug, Clone, Default)]
pub struct Section {
    /// Heading.
    pub title: String,
    /// How the figures were obtained.
    pub method: String,
    /// Table rows; the first is the header.
    pub table: Vec<Vec<String>>,
    /// Remarks below the table.
    pub notes: Vec<String>,
    /// Targets checked by this scenario.
    pub targets: Vec<TargetCheck>,
    /// Markdown written as it is after the notes (tables made elsewhere).
    pub body: String,
}

impl Section {
    /// Adds a target check.
    pub fn target(&mut self, name: &str, measured: String, goal: &str, met: bool) {
        self.targets.push(TargetCheck {
            name: name.to_owned(),
            measured,
            goal: goal.to_owned(),
            met,
        });
    }
}

/// Renders the whole report.
pub fn render(header: &str, sections: &[Section]) -> String {
    let mut out = String::new();
    out.push_str(header);
    let targets: Vec<&TargetCheck> = sections.iter().flat_map(|s| &s.targets).collect();
    if !targets.is_empty() {
        out.push_str("\n## Targets\n\n| target | measured | goal | met |\n|---|---|---|---|\n");
        for t in &targets {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                t.name,
                t.measured,
                t.goal,
                if t.met { "yes" } else { "**no**" }
            );
        }
    }
    for section in sections {
        let _ = write!(out, "\n## {}\n\n{}\n", section.title, section.method.trim());
        if let Some((head, rows)) = section.table.split_first() {
            let _ = write!(
                out,
                "\n| {} |\n|{}\n",
                head.join(" | "),
                "---|".repeat(head.len())
            );
            for row in rows {
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
        }
        if !section.notes.is_empty() {
            out.push('\n');
            for note in &section.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        if !section.body.is_empty() {
            let _ = writeln!(out, "\n{}", section.body.trim());
        }
    }
    out
}

/// Formats a float with `digits` decimals.
pub fn fixed(value: f64, digits: usize) -> String {
    format!("{value:.digits$}")
}
