//! The `sft-collate` command line: `collate` (JSONL to safetensors batches), `show` (the position table
//! of one row). See `sft-collate --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
