//! `hypura run --interactive`: a chat on stdin/stdout that keeps the KV cache across turns.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

use anyhow::Result;
use hypura::chat::{encode_prompt, ChatTemplate, Conversation, Turn};
use hypura::generate::{generate_after, GenerateOptions, Sampler, StopReason};
use hypura::loader::LoadedModel;
use hypura::models::{LanguageModel, Logits};
use hypura::tokenizer::StreamDecoder;

use crate::common::chat_template;
use crate::run::{stop_ids, RunArgs};

const HELP: &str = "/reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this";

/// The chat loop. Replies go to stdout, everything else to stderr.
pub fn chat(a: &RunArgs, m: &mut LoadedModel) -> Result<()> {
    let tpl = chat_template(m);
    let n_ctx = m.model.n_ctx();
    let tty = std::io::stdin().is_terminal();
    eprintln!("hypura: chatting with {}; {HELP}", tpl.describe());
    let mut s = Session {
        conv: Conversation::new(a.system.clone()),
        cached: Vec::new(),
        sampler: Sampler::new(a.sampling()),
        opts: GenerateOptions {
            max_new_tokens: a.n_predict.unwrap_or(usize::MAX),
            stop_ids: stop_ids(&m.tokenizer),
            batch_size: a.batch_size.max(1),
        },
        start_over: false,
    };
    let mut input = std::io::stdin().lock().lines();
    let mut first = a.prompt.clone();
    loop {
        let line = match first.take() {
            Some(p) => p,
            None => {
                if tty {
                    eprint!(">>> ");
                    std::io::stderr().flush()?;
                }
                match input.next() {
                    Some(l) => l?,
                    None => break, // EOF (Ctrl-D)
                }
            }
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/help" | "/?" => {
                eprintln!("hypura: {HELP}");
                continue;
            }
            "/reset" | "/clear" => {
                s.reset(m);
                eprintln!("hypura: conversation cleared");
                continue;
            }
            t if t.starts_with('/') => {
                eprintln!("hypura: unknown command {t}; {HELP}");
                continue;
            }
            _ => {}
        }
        let Some(tokens) = s.prepare(m, &tpl, text, n_ctx, &mut input)? else {
            continue;
        };
        s.reply(m, &tokens, n_ctx)?;
    }
    if tty {
        eprintln!();
    }
    Ok(())
}

struct Session {
    conv: Conversation,
    /// Tokens in the KV cache.
    cached: Vec<u32>,
    sampler: Sampler,
    opts: GenerateOptions,
    /// The context filled up during the last reply: the next message starts over.
    start_over: bool,
}

impl Session {
    fn reset(&mut self, m: &mut LoadedModel) {
        self.conv.reset();
        m.model.reset();
        self.cached.clear();
        self.start_over = false;
    }

    /// The tokens to feed for the user's message `text` (the cache is emptied first when the
    /// turn restarts), or `None` when it is not sent.
    fn prepare(
        &mut self,
        m: &mut LoadedModel,
        tpl: &ChatTemplate,
        text: &str,
        n_ctx: usize,
        input: &mut impl Iterator<Item = std::io::Result<String>>,
    ) -> Result<Option<Vec<u32>>> {
        let turn = match self.conv.user(tpl, text) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("hypura: {e}");
                return Ok(None);
            }
        };
        let turn = if std::mem::take(&mut self.start_over) {
            eprintln!("hypura: new conversation (the earlier turns are forgotten)");
            Turn::Restart(self.conv.start_over(tpl)?)
        } else {
            turn
        };
        let (mut tokens, mut restart) = match &turn {
            Turn::Continue(delta) => (m.tokenizer.encode(delta, false, true)?, false),
            Turn::Restart(full) => (encode_prompt(&m.tokenizer, full)?, true),
        };
        let room = if restart {
            n_ctx
        } else {
            n_ctx - m.model.n_past()
        };
        if tokens.len() > room && !restart {
            eprint!(
                "hypura: the context is full ({} of {n_ctx} tokens used, this message needs {}). \
                 Start a new conversation with it? [Y/n] ",
                m.model.n_past(),
                tokens.len()
            );
            // End of input counts as no.
            let answer = match input.next() {
                Some(l) => l?,
                None => "n".into(),
            };
            eprintln!();
            if answer.trim().to_lowercase().starts_with('n') {
                self.conv.withdraw();
                eprintln!("hypura: not sent; /reset starts over");
                return Ok(None);
            }
            tokens = encode_prompt(&m.tokenizer, &self.conv.start_over(tpl)?)?;
            restart = true;
            eprintln!("hypura: new conversation (the earlier turns are forgotten)");
        }
        if tokens.len() > n_ctx {
            eprintln!(
                "hypura: this message takes {} tokens with the chat format, more than the context \
                 of {n_ctx} tokens; it was not sent (a larger -c would help)",
                tokens.len()
            );
            self.conv.withdraw();
            return Ok(None);
        }
        if restart {
            m.model.reset();
            self.cached.clear();
        }
        Ok(Some(tokens))
    }

    /// Generates the reply to `tokens`, streamed to stdout, and keeps the cache in step with
    /// the conversation.
    fn reply(&mut self, m: &mut LoadedModel, tokens: &[u32], n_ctx: usize) -> Result<()> {
        let mut decoder = StreamDecoder::new(&m.tokenizer);
        let mut reply = String::new();
        let mut generated = Vec::new();
        let mut out = std::io::stdout().lock();
        let stats = generate_after(
            &mut m.model,
            &self.cached,
            tokens,
            &self.opts,
            &mut self.sampler,
            &mut |id| {
                generated.push(id);
                if let Some(t) = decoder.push(id) {
                    out.write_all(t.as_bytes())
                        .and_then(|_| out.flush())
                        .map_err(|e| {
                            hypura::Error::InvalidRequest(format!("writing to stdout: {e}"))
                        })?;
                    reply += &t;
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        let rest = decoder.finish();
        reply += &rest;
        writeln!(out, "{rest}")?;
        out.flush()?;
        let whole = self.cached.len() + tokens.len() + generated.len();
        self.cached.extend_from_slice(tokens);
        self.cached.extend_from_slice(&generated);
        self.cached.truncate(m.model.n_past());
        // A reply cut by -n left its last token out of the cache: feed it, so the cache holds
        // the whole reply the conversation records.
        if stats.stop == StopReason::MaxTokens && self.cached.len() < whole {
            if let Some(&last) = generated.last() {
                if m.model.n_past() < n_ctx {
                    m.model.forward(&[last], Logits::Last)?;
                    self.cached.push(last);
                }
            }
        }
        self.conv.assistant(&reply);
        eprintln!(
            "hypura: {} tokens in {:.2} s ({:.1} tok/s); prompt {} tokens ({:.1} tok/s); context {}/{n_ctx}",
            stats.n_generated,
            stats.generate_seconds,
            stats.generate_tok_s(),
            stats.n_prompt,
            stats.prompt_tok_s(),
            m.model.n_past()
        );
        if stats.stop == StopReason::ContextFull {
            self.start_over = true;
            eprintln!(
                "hypura: the context is full ({n_ctx} tokens), so the reply was cut. Your next message \
                 starts a new conversation (the system prompt is kept); -c sets a larger context"
            );
        }
        Ok(())
    }
}
