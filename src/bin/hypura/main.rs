//! `hypura`: run GGUF models that may not fit in memory.

mod bench;
mod chat_repl;
mod check_cmds;
mod common;
mod expert_stats;
mod inspect_cmd;
mod iobench_cmd;
mod optimize_cmd;
mod plan_cmds;
mod run;
#[cfg(feature = "server")]
mod serve_cmd;
mod synth_cmd;

use clap::{Parser, Subcommand};

const ABOUT: &str = "Storage-tier-aware LLM inference for GGUF models (Llama, Qwen2, Mixtral).";

const AFTER_HELP: &str = "\
MODEL is a path to a .gguf file (the first part of a split set also works) or a Hugging Face
reference ORG/REPO:FILE.gguf, downloaded into the standard Hub cache and found there offline
(HF_HUB_OFFLINE=1).

Examples:
  hypura run -m model.gguf -p \"The capital of France is\" -n 32
  hypura run -m bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf -p Hi
  hypura run -m model.gguf --interactive
  hypura serve -m model.gguf --port 8080
  hypura perplexity -m model.gguf -f wiki.test.raw -c 512
  hypura bench -m model.gguf -p 128 -n 64 -t 2
  hypura inspect -m model.gguf
  hypura iobench -m model.gguf --read-gb 1
  hypura optimize -m moe.gguf -o moe-opt.gguf --ram-budget 2GiB";

#[derive(Parser)]
#[command(name = "hypura", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout (timings on stderr); --interactive chats.
    Run(run::RunArgs),
    /// Serve the model over HTTP: Ollama's API (/api/chat, ...) and OpenAI's (/v1/chat/completions, ...).
    #[cfg(feature = "server")]
    Serve(serve_cmd::ServeArgs),
    /// Print the token ids of a text as a JSON array (like llama-tokenize).
    Tokenize(check_cmds::TokenizeArgs),
    /// Write the logits of one forward pass over given token ids to a .npy file.
    Logits(check_cmds::LogitsArgs),
    /// Perplexity of a text file, computed exactly as llama-perplexity does.
    Perplexity(check_cmds::PerplexityArgs),
    /// Measure prompt-processing and generation speed (llama-bench style table).
    Bench(bench::BenchArgs),
    /// Measure this machine: device and RAM (cgroup-aware), memory and disk bandwidth.
    Profile(plan_cmds::ProfileArgs),
    /// Show where every tensor of a model would live here, and the predicted speed.
    Plan(plan_cmds::PlanArgs),
    /// Show what a GGUF holds: architecture, hyper-parameters, tensors by role, the plan here.
    Inspect(inspect_cmd::InspectArgs),
    /// Measure read throughput of a model's file at the request sizes hypura uses.
    Iobench(iobench_cmd::IobenchArgs),
    /// Rewrite a MoE GGUF so that experts used together are read together (same logits).
    Optimize(optimize_cmd::OptimizeArgs),
    /// Write a GGUF with a real model's tensors and random weights (for benchmarks and sizing).
    Synth(synth_cmd::SynthArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        #[cfg(feature = "server")]
        Command::Serve(a) => serve_cmd::serve(a),
        Command::Tokenize(a) => check_cmds::tokenize(a),
        Command::Logits(a) => check_cmds::logits(a),
        Command::Perplexity(a) => check_cmds::perplexity(a),
        Command::Bench(a) => bench::bench(a),
        Command::Profile(a) => plan_cmds::profile(a),
        Command::Plan(a) => plan_cmds::plan(a),
        Command::Inspect(a) => inspect_cmd::inspect(a),
        Command::Iobench(a) => iobench_cmd::iobench(a),
        Command::Optimize(a) => optimize_cmd::optimize(a),
        Command::Synth(a) => synth_cmd::synth(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
