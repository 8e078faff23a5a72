//! The command line: flags mapped to the library's configs, results printed. Every behaviour lives in the
//! library; a subcommand is its flags and a call.

mod bench;
mod collate;
mod doctor;
mod export;
mod loss;
mod show;
mod tokenize;

use std::process::ExitCode;
use std::str::FromStr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use sft_collate::input::{MessageFormat, RowFormat, Template};
use sft_collate::{CollateSpec, EngineChoice, Error, IdDtype, LabelFormat, Tokenizer, Truncation};

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
    /// Tokenize a JSONL file once into a token store (Arrow files, sharded across processes), for
    /// `collate --from` and trainers' loaders.
    Tokenize(tokenize::TokenizeArgs),
    /// Export a token store as Megatron-Bridge packed-sequence Parquet (input_ids, loss_mask,
    /// seq_start_id).
    Export(export::ExportArgs),
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

/// A library option enum as a flag value: its names are the possible values.
fn choice<T>(names: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: FromStr<Err = Error> + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).map(|name| name.parse().expect("one of the names"))
}

/// A flag's value parsed by the library's `FromStr`, its error as the reason alone (clap already says
/// "invalid value 'X' for '--flag'": the library's "invalid option flag:" would say it twice).
fn parsed<T: FromStr<Err = Error>>(value: &str) -> std::result::Result<T, String> {
    value.parse().map_err(|e| match e {
        Error::InvalidOption { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// Where the tokenizer comes from.
#[derive(Args, Debug, Clone)]
struct TokenizerArgs {
    /// A tokenizer.json (or a directory holding one), or a built-in: o200k_base, cl100k_base.
    #[arg(long, default_value = "o200k_base")]
    tokenizer: String,
    /// Which encoder runs it: `auto` takes the fast BPE encoder when it supports the tokenizer
    /// (same ids as Hugging Face `tokenizers`) and `tokenizers` otherwise; `fast` fails instead of falling
    /// back; `tokenizers` always uses `tokenizers`. The manifest and `doctor --tokenizer` say which ran.
    #[arg(long, default_value = "auto", value_parser = choice::<EngineChoice>(EngineChoice::NAMES))]
    tokenizer_engine: EngineChoice,
}

impl TokenizerArgs {
    fn load(&self) -> sft_collate::Result<Tokenizer> {
        Tokenizer::load_with(&self.tokenizer, self.tokenizer_engine)
    }
}

/// How JSONL rows become (prompt, output) pairs or conversations.
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
    /// The key of a message's role (ShareGPT: from).
    #[arg(long, default_value = "role")]
    role_key: String,
    /// The key of a message's text (ShareGPT: value).
    #[arg(long, default_value = "content")]
    content_key: String,
    /// Roles renamed before the template and --train-roles see them, comma-separated FROM=TO (ShareGPT:
    /// human=user,gpt=assistant).
    #[arg(long, value_name = "FROM=TO", value_delimiter = ',')]
    role_names: Vec<String>,
}

/// The text of the file a flag names; an error names the flag.
fn read_text(flag: &'static str, path: &std::path::Path) -> sft_collate::Result<String> {
    let invalid = |reason: String| Error::InvalidOption {
        name: flag,
        reason: format!("{}: {reason}", path.display()),
    };
    let bytes = sft_collate::io::read_file(path).map_err(|e| invalid(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 text (at byte {})",
            e.utf8_error().valid_up_to() + 1
        ))
    })
}

impl RowArgs {
    fn row_format(&self) -> sft_collate::Result<RowFormat> {
        let template = match &self.template {
            Some(path) => Some(Template::parse(&read_text("template", path)?)?),
            None => None,
        };
        let message_template = match &self.message_template {
            Some(path) => Some(read_text("message_template", path)?),
            None => None,
        };
        let mut messages =
            MessageFormat::new(message_template.as_deref(), self.train_roles.clone())?;
        messages.key = self.messages_key.clone();
        messages.role_key = self.role_key.clone();
        messages.content_key = self.content_key.clone();
        messages.role_names = self
            .role_names
            .iter()
            .map(|spec| MessageFormat::parse_role_name(spec))
            .collect::<sft_collate::Result<_>>()?;
        Ok(RowFormat {
            prompt_key: self.prompt_key.clone(),
            output_key: self.output_key.clone(),
            template,
            messages: Some(messages),
        })
    }
}

/// Everything that shapes the tensors.
#[derive(Args, Debug, Clone)]
struct SpecArgs {
    /// The longest sequence (prompt + output tokens) allowed.
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// What to do with a sequence over --max-len.
    #[arg(long, default_value = "error", value_parser = choice::<Truncation>(Truncation::NAMES))]
    truncate: Truncation,
    /// Round the tensors' width up to a multiple of M.
    #[arg(long, value_name = "M")]
    pad_to_multiple_of: Option<usize>,
    /// How labels are written where the mask is false: pad_id (CS336; use the mask in the loss), or -100
    /// (PyTorch's ignore_index).
    #[arg(long, default_value = "pad", value_parser = choice::<LabelFormat>(LabelFormat::NAMES))]
    labels: LabelFormat,
    /// Integer type of input_ids and labels.
    #[arg(long, default_value = "i32", value_parser = choice::<IdDtype>(IdDtype::NAMES))]
    id_dtype: IdDtype,
    /// The pad id (default: the tokenizer's pad token, else <|endoftext|>).
    #[arg(long, value_name = "ID")]
    pad_id: Option<u32>,
    /// Also write attention_mask (true on real tokens, false on padding).
    #[arg(long)]
    attention_mask: bool,
}

impl SpecArgs {
    fn spec(&self) -> CollateSpec {
        CollateSpec {
            pad_id: self.pad_id,
            max_len: self.max_len,
            truncation: self.truncate,
            pad_to_multiple_of: self.pad_to_multiple_of,
            label_format: self.labels,
            id_dtype: self.id_dtype,
            attention_mask: self.attention_mask,
        }
    }
}

/// An option's flag, from the library's name for it (`max_len` → `--max-len`).
fn flag(name: &str) -> String {
    format!("--{}", name.replace('_', "-"))
}

/// An error in the user's terms: options as the flags they typed.
fn describe(error: &Error) -> String {
    match error {
        Error::At { at, source } => format!("{at}: {}", describe(source)),
        Error::InvalidOption { name, reason } => format!(
            "{} {}",
            flag(name),
            reason
                .replace("pass overwrite", "pass --overwrite")
                .replace("allow_pad_id_outside_vocab", "--allow-pad-id-outside-vocab")
        ),
        Error::SequenceTooLong {
            len,
            prompt_len,
            output_len,
            max_len,
            limit,
        } => {
            let hint = match *limit {
                "pack" => "--pack-overflow truncate or split to cut it",
                "pack_size" => {
                    return format!(
                        "{len} tokens (prompt {prompt_len} + output {output_len}) take {} positions, \
                         over --pack-size {max_len} (--truncate prompt-left or output-right to cut it)",
                        len - 1
                    )
                }
                _ => "--truncate prompt-left or output-right to cut it",
            };
            format!(
                "{len} tokens (prompt {prompt_len} + output {output_len}) exceed {} {max_len} ({hint})",
                flag(limit)
            )
        }
        Error::BatchTooLarge {
            what,
            rows,
            width,
            bytes,
            limit,
        } => format!(
            "{what} would be {rows} rows x {width} positions = {} MB, over the {} MB allowed \
             (--max-batch-bytes); lower --batch-size or --pad-to-multiple-of, or set --max-len",
            bytes / 1_000_000,
            limit / 1_000_000
        ),
        Error::Empty(message) => message.replace("allow_empty", "--allow-empty"),
        Error::OutputBusy { .. } => error.to_string().replace("wait_for_lock", "--wait"),
        Error::Store { .. } => error
            .to_string()
            .replace("(overwrite to", "(--overwrite to"),
        other => other.to_string(),
    }
}

/// Every option of `command` and its subcommands takes a negative number as its value, so that
/// `--pad-id -1` is refused as a bad value of `--pad-id` (saying why) rather than as an unknown flag `-1`.
fn negative_numbers_are_values(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| arg.allow_negative_numbers(true))
        .mut_subcommands(negative_numbers_are_values)
}

pub fn main() -> ExitCode {
    let matches = negative_numbers_are_values(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Collate(args) => collate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Export(args) => export::run(args),
        Command::Show(args) => show::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
