//! Argument parsing and dispatch. Each subcommand lives in its own file.

mod backend;
mod bench;
mod collate;
mod doctor;
mod loss;
mod show;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sft_collate::input::{MessageFormat, RowFormat, Template};
use sft_collate::EngineChoice;
use sft_collate::{CollateSpec, IdDtype, LabelFormat, Tokenizer, Truncation};

/// Turn (prompt, output) text pairs into input_ids, labels and response_mask for supervised fine-tuning.
///
/// Prompts and outputs are tokenized separately (no special tokens), concatenated, right-padded, shifted
/// by one, and masked so that only labels that are output tokens are trained on (CS336's
/// tokenize_prompt_and_output).
#[derive(Parser, Debug)]
#[command(name = "sft-collate", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Collate a JSONL file into safetensors batches (input_ids, labels, response_mask) and a manifest.
    Collate(collate::CollateArgs),
    /// Show one row position by position: input token, label, mask. Checks the off-by-one by eye.
    Show(show::ShowArgs),
    /// Report the CUDA driver, NVRTC, device and kernels, and check the kernels against the CPU path.
    Doctor(doctor::DoctorArgs),
    /// Masked cross-entropy of a safetensors file: log-probs, entropy, lse, loss and, with --grad, the
    /// gradient of the logits.
    Loss(loss::LossArgs),
    /// Microbenchmarks (`bench loss`).
    Bench(bench::BenchArgs),
}

/// Where the tokenizer comes from.
#[derive(Args, Debug, Clone)]
struct TokenizerArgs {
    /// A tokenizer.json (or a directory holding one), or a built-in: o200k_base, cl100k_base.
    #[arg(long, default_value = "o200k_base")]
    tokenizer: String,
    /// Which encoder runs it: `auto` takes the fast byte-level BPE encoder when it supports the tokenizer
    /// (same ids as Hugging Face `tokenizers`) and `tokenizers` otherwise; `fast` fails instead of falling
    /// back; `tokenizers` always uses `tokenizers`. The manifest and `doctor --tokenizer` say which ran.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    tokenizer_engine: EngineChoice,
}

impl TokenizerArgs {
    fn load(&self) -> sft_collate::Result<Tokenizer> {
        Tokenizer::load_with(&self.tokenizer, self.tokenizer_engine)
    }
}

/// How JSONL rows become (prompt, output) pairs.
#[derive(Args, Debug, Clone)]
struct RowArgs {
    /// The key holding the prompt (ignored with --template).
    #[arg(long, default_value = "prompt")]
    prompt_key: String,
    /// The key holding the output.
    #[arg(long, default_value = "output")]
    output_key: String,
    /// A template file; its {name} placeholders are filled from the row's fields and the result is the
    /// prompt (write {{ and }} for literal braces).
    #[arg(long, value_name = "FILE")]
    template: Option<std::path::PathBuf>,
    /// Rows holding this key are conversations: a list of {"role", "content"} messages.
    #[arg(long, default_value = "messages")]
    messages_key: String,
    /// How each message is rendered: a file with {content} and optionally {role}, e.g.
    /// "<|im_start|>{role}\n{content}<|im_end|>\n". What precedes {content} is never trained. Default:
    /// the content alone.
    #[arg(long, value_name = "FILE")]
    message_template: Option<std::path::PathBuf>,
    /// Roles whose messages are trained (comma-separated).
    #[arg(long, default_value = "assistant", value_delimiter = ',')]
    train_roles: Vec<String>,
}

impl RowArgs {
    fn row_format(&self) -> sft_collate::Result<RowFormat> {
        let template = match &self.template {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| sft_collate::Error::io(path, e))?;
                Some(Template::parse(&text)?)
            }
            None => None,
        };
        let message_template = match &self.message_template {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|e| sft_collate::Error::io(path, e))?)
            }
            None => None,
        };
        let mut messages =
            MessageFormat::new(message_template.as_deref(), self.train_roles.clone())?;
        messages.key = self.messages_key.clone();
        Ok(RowFormat {
            prompt_key: self.prompt_key.clone(),
            output_key: self.output_key.clone(),
            template,
            messages: Some(messages),
        })
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum TruncateArg {
    Error,
    PromptLeft,
    OutputRight,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LabelsArg {
    /// Labels hold pad_id past the end of the sequence (CS336); use the mask in the loss.
    Pad,
    /// Labels are -100 wherever the mask is false (PyTorch's ignore_index).
    IgnoreIndex,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum IdDtypeArg {
    I32,
    I64,
}

/// Everything that shapes the tensors.
#[derive(Args, Debug, Clone)]
struct SpecArgs {
    /// The longest sequence (prompt + output tokens) allowed.
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// What to do with a sequence over --max-len.
    #[arg(long, value_enum, default_value = "error")]
    truncate: TruncateArg,
    /// Round the tensors' width up to a multiple of M.
    #[arg(long, value_name = "M")]
    pad_to_multiple_of: Option<usize>,
    /// How labels are written where the mask is false.
    #[arg(long, value_enum, default_value = "pad")]
    labels: LabelsArg,
    /// Integer type of input_ids and labels.
    #[arg(long, value_enum, default_value = "i32")]
    id_dtype: IdDtypeArg,
    /// The pad id (default: the tokenizer's pad token, else <|endoftext|>).
    #[arg(long, value_name = "ID")]
    pad_id: Option<u32>,
    /// Also write attention_mask (true on real tokens, false on padding).
    #[arg(long)]
    attention_mask: bool,
}

impl SpecArgs {
    fn spec(&self, tokenizer: &Tokenizer) -> sft_collate::Result<CollateSpec> {
        let spec = CollateSpec {
            pad_id: Some(tokenizer.resolve_pad_id(self.pad_id)?),
            max_len: self.max_len,
            truncation: match self.truncate {
                TruncateArg::Error => Truncation::Error,
                TruncateArg::PromptLeft => Truncation::PromptLeft,
                TruncateArg::OutputRight => Truncation::OutputRight,
            },
            pad_to_multiple_of: self.pad_to_multiple_of,
            label_format: match self.labels {
                LabelsArg::Pad => LabelFormat::Pad,
                LabelsArg::IgnoreIndex => LabelFormat::IGNORE_INDEX,
            },
            id_dtype: match self.id_dtype {
                IdDtypeArg::I32 => IdDtype::I32,
                IdDtypeArg::I64 => IdDtype::I64,
            },
            attention_mask: self.attention_mask,
        };
        spec.validate()?;
        Ok(spec)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Collate(args) => collate::run(args),
        Command::Show(args) => show::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
