//! Tables people read: columns as wide as their content, the whole fitted
//! to the terminal (long cells wrap) — or as wide as it needs with
//! `-o wide`, or when the output is not a terminal (a pipe, a file).
//! `COLUMNS`, when set, is the width to fit.

use std::io::Write;

use comfy_table::{presets::NOTHING, CellAlignment, ContentArrangement, Table};

use crate::Output;

/// A table being filled.
pub(crate) struct Rows {
    table: Table,
    /// Columns whose cells are numbers (right-aligned).
    numeric: Vec<usize>,
}

impl Rows {
    /// A table with these column names; those in `numeric` are right-aligned.
    pub(crate) fn new(header: &[&str], numeric: &[usize]) -> Self {
        let mut table = Table::new();
        table.load_style(NOTHING);
        table.set_header(header.iter().copied());
        Self {
            table,
            numeric: numeric.to_vec(),
        }
    }

    /// Adds a row.
    pub(crate) fn push(&mut self, cells: Vec<String>) {
        self.table.add_row(cells);
    }

    /// Prints the table (nothing when it has no rows but its header).
    pub(crate) fn print(mut self, out: &mut (impl Write + ?Sized), output: Output) {
        for &i in &self.numeric {
            if let Some(c) = self.table.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        match width(output) {
            Some(w) => {
                self.table
                    .set_content_arrangement(ContentArrangement::Dynamic)
                    .set_width(w);
            }
            None => {
                self.table
                    .set_content_arrangement(ContentArrangement::Disabled);
            }
        }
        let text = self.table.to_string();
        // The preset pads each line; the trailing blanks are noise.
        for line in text.lines() {
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
}

/// The width to fit, if any.
fn width(output: Output) -> Option<u16> {
    if output == Output::Wide {
        return None;
    }
    if let Some(w) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|&w| w >= 20)
    {
        return Some(w);
    }
    terminal_size::terminal_size_of(std::io::stdout()).map(|(w, _)| w.0)
}
