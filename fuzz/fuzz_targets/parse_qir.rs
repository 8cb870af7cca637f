//! Fuzzes the `.qir` parser: it must never panic, and whatever it accepts must print canonically, i.e.
//! `print(parse(print(g))) == print(g)` for `g = parse(input)`, in both elided and inline constant modes.
//! Type inference and the verifier also run on every parsed graph, since they must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcc_ir::text::{parse, print_with, ConstantMode, PrintOptions};
use qcc_ir::{infer_types, verify};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(graph) = parse(text) else { return };
    for constants in [ConstantMode::Inline, ConstantMode::Elide { max_inline_elements: 16 }] {
        let options = PrintOptions { constants };
        let printed = print_with(&graph, &options).text;
        let reparsed = match parse(&printed) {
            Ok(g) => g,
            Err(e) => panic!("printed text does not parse: {e}\n{printed}"),
        };
        let again = print_with(&reparsed, &options).text;
        assert_eq!(printed, again, "printing is not canonical");
    }
    let _ = verify(&graph);
    let mut inferred = graph;
    let _ = infer_types(&mut inferred);
});
