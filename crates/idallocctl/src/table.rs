//! The text tables of `fork list`, `status` and `bench`, laid out by comfy-table.
//!
//! One style for all of them, for people and for `grep`/`awk` alike: a header row
//! of upper-case column names, every column as wide as its widest cell, two spaces
//! between columns, no borders, no colour and no trailing blanks. A cell never holds
//! a space where a script would split fields, except in the last column (free text
//! such as `unavailable: ...`). The output is the same on a terminal as in a pipe:
//! comfy-table is built without its `tty` feature, so it neither probes the
//! terminal's width nor wraps a line.

use comfy_table::{presets::NOTHING, CellAlignment, Table};

/// Spaces between two columns.
const GAP: u16 = 2;

/// A table with this header row; the columns whose index is in `right` (numbers)
/// are right-aligned, header included.
pub fn new(header: &[&str], right: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header.to_vec());
    let last = header.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { GAP }));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// The table as lines to print, without trailing blanks.
pub fn render(table: &Table) -> String {
    table.trim_fmt()
}

/// Free text for a table cell: one line, so that a row stays one line.
pub fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut t = new(&["NAME", "N", "STATE"], &[1]);
        t.add_row(vec!["primary", "7", "live"]);
        t.add_row(vec![
            "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203",
            "123456789012",
            "unavailable: the store is down",
        ]);
        assert_eq!(
            render(&t),
            "\
NAME                                             N  STATE
primary                                          7  live
0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  123456789012  unavailable: the store is down"
        );
    }

    #[test]
    fn rows_are_split_by_awk_as_by_their_columns() {
        let mut t = new(&["FORK", "NEXT_VID", "STATE"], &[1]);
        t.add_row(vec!["a", "1", "dropped"]);
        for line in render(&t).lines() {
            assert_eq!(line.split_whitespace().count(), 3, "{line:?}");
            assert!(line.is_ascii() && !line.ends_with(' '), "{line:?}");
        }
    }

    #[test]
    fn free_text_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
