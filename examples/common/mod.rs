//! What the three family examples share: arguments, model resolution, generation.
//! This is also the shortest complete use of hypura as a library.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser};
use hypura::generate::{generate, GenerateOptions, Sampler, SamplingParams};
use hypura::hub::{resolve, HubOptions, ModelRef};
use hypura::loader::{load, LoadOptions};
use hypura::tokenizer::StreamDecoder;

#[derive(Parser, Debug)]
pub struct Args {
    /// A .gguf path or a Hub reference ORG/REPO:FILE.gguf (the default is downloaded once into
    /// the Hugging Face cache, then found there offline).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(
        short = 'p',
        long,
        default_value = "The best thing about open models is"
    )]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub n: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// [`main`], with errors printed plainly and exit code 1.
pub fn run(family: &str, default_model: &str) {
    if let Err(e) = main(family, default_model) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Parses arguments, loads the model (`default_model` when `--model` is absent), generates.
pub fn main(family: &str, default_model: &str) -> Result<()> {
    let cmd = Args::command()
        .name(Box::leak(family.to_lowercase().into_boxed_str()) as &str)
        .about(format!("Generate text with a {family} GGUF model, using hypura as a library."))
        .after_help(format!(
            "Default model (when --model is absent): {default_model}\n\
             It is fetched from the Hugging Face Hub into the standard cache (~/.cache/huggingface/hub)\n\
             and found there offline afterwards (HF_HUB_OFFLINE=1). Any local {family} GGUF works too."
        ));
    let args = Args::from_arg_matches(&cmd.get_matches())?;
    let reference = args
        .model
        .clone()
        .unwrap_or_else(|| default_model.to_string());
    let path = resolve(&ModelRef::parse(&reference)?, &HubOptions::from_env()).map_err(|e| {
        anyhow::anyhow!("{e}\n(pass --model PATH.gguf to use a local {family} GGUF file)")
    })?;
    let opts = LoadOptions {
        progress: true,
        device: hypura::backend::best_device()?,
        ..Default::default()
    };
    let mut m = load(&path, &opts)?;
    eprintln!(
        "{family} example: {} loaded in {:.2} s",
        path.display(),
        m.load_seconds
    );

    let prompt = m.tokenizer.encode(&args.prompt, true, true)?;
    let params = SamplingParams {
        temperature: args.temp,
        seed: Some(args.seed),
        ..Default::default()
    };
    let stop_ids = (0..m.config.n_vocab as u32)
        .filter(|&t| m.tokenizer.is_end_of_generation(t))
        .collect();
    let gen_opts = GenerateOptions {
        max_new_tokens: args.n,
        stop_ids,
        ..Default::default()
    };
    let mut decoder = StreamDecoder::new(&m.tokenizer);
    print!("{}", args.prompt);
    let stats = generate(
        &mut m.model,
        &prompt,
        &gen_opts,
        &mut Sampler::new(params),
        &mut |id| {
            if let Some(s) = decoder.push(id) {
                print!("{s}");
                let _ = std::io::stdout().flush();
            }
            Ok(ControlFlow::Continue(()))
        },
    )?;
    println!("{}", decoder.finish());
    eprintln!(
        "{:.1} tok/s prompt, {:.1} tok/s generation",
        stats.prompt_tok_s(),
        stats.generate_tok_s()
    );
    Ok(())
}
