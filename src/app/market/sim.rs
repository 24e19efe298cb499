//! The built-in simulated market: live data with no publisher attached.
//!
//! Two independent Poisson processes drive it, one for trades (at
//! [`SimConfig::trades_per_sec`], summed over all symbols) and one for the
//! other events, `payment` and `contract_event` (at
//! [`SimConfig::events_per_sec`]). Inter-arrival times are exponential, so
//! the rates are averages: a second may see more or fewer events, as on a
//! real market.
//!
//! Symbols:
//! - `PUMP-SOL` ([`DEFAULT_SYMBOL`]): a pump.fun-like constant-product
//!   bonding curve starting at 30 virtual SOL and 1 073 000 000 virtual
//!   tokens. Each trade buys or sells a random amount of SOL (log-uniform,
//!   0.001 to 0.25 SOL) and moves the reserves along `sol * tokens = k`; the
//!   trade's price is the spot price after it,
//!   `virtual_sol_reserves / virtual_token_reserves`, in SOL per token,
//!   with [`CURVE_PRICE_DP`] decimal places (about 11 significant digits at
//!   the start of the curve). SOL reserves stay between 30 and 115 SOL: a
//!   trade that would leave that range goes the other way.
//! - `BTC-USD` (around 45 000), `ETH-USD` (around 2 500), `SOL-USD`
//!   (around 150): geometric random walks with Gaussian steps and a weak
//!   pull back to their anchor price, so they wander by a few percent but
//!   stay recognisable for hours. Prices have 2 decimal places and are never
//!   below 0.01.
//!
//! Every event is a flat JSON object with a `type` and a `ts` (unix
//! milliseconds). The `ts` is taken from the simulated schedule
//! (`start_unix_ms` plus the scheduled offset), never from the wall clock, so
//! a run is reproducible from its seed and the instants it is polled at.
//! Decimal values (prices, quantities, amounts) are JSON strings. Account
//! ids (8 `G…` accounts) and contract ids (`C…`) are well-formed Stellar
//! strkeys drawn from the seed, so filters on accounts, assets and amounts
//! all have something to match; see [`SimFeed::account_ids`].
//!
//! ```text
//! {"type":"trade","symbol":"BTC-USD","price":"45012.37","qty":"0.0153","side":"buy","ts":1748465400123,
//!  "account_id":"GA…","asset_code":"BTC","amount":"0.0153","notional":"688.69","trade_id":17}
//! {"type":"payment","from":"GA…","to":"GB…","asset_code":"USDC","amount":"123.4500000","ts":…,"transaction_hash":"<64 hex>"}
//! {"type":"contract_event","ledger":1454282,"transaction_hash":"<64 hex>","contract_id":"CA…",
//!  "topics":["transfer","GA…","GB…","USDC"],"data":{"amount":"10.0000000"},"ts":…}
//! ```
//!
//! A trade's `amount` is its `qty`, in units of its `asset_code` (the base
//! asset: `BTC`, `ETH`, `SOL`, or `PUMP` tokens), as a payment's amount is
//! in units of its asset; `notional` is `price * qty` in the quote currency
//! (USD with 2 decimals, or SOL with 9 for `PUMP-SOL`, where it is the SOL
//! that changed hands). For `PUMP-SOL` a `buy` adds SOL to the curve and
//! takes tokens out; for the random walks `buy` is an up-tick (or no
//! change) and `sell` a down-tick.
//!
//! Reproducibility holds for a given build: `StdRng`'s algorithm may change
//! between `rand` releases.

use std::time::{Duration, Instant};

use log::info;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Map, Value};

/// The symbol the K-line service's plain-text commands use.
pub const DEFAULT_SYMBOL: &str = "PUMP-SOL";
pub const DEFAULT_TRADES_PER_SEC: f64 = 20.0;
pub const DEFAULT_EVENTS_PER_SEC: f64 = 4.0;
/// The highest rate [`SimConfig::validate`] accepts, per process.
pub const MAX_RATE_PER_SEC: f64 = 100_000.0;
/// At most this many events per [`SimFeed::poll`]; the rest stays due.
pub const MAX_EVENTS_PER_POLL: usize = 1000;
/// When the schedule is further behind `now` than this (the event loop
/// stalled, the machine slept), the feed skips ahead instead of replaying
/// the missed trades in a burst: nothing is generated for the skipped time.
pub const MAX_LAG: Duration = Duration::from_secs(10);
/// Decimal places of the bonding-curve price (SOL per token, about 3e-8 at
/// the start of the curve).
pub const CURVE_PRICE_DP: u32 = 18;
/// Ledger number of contract events at the start; it advances by one every
/// [`LEDGER_CLOSE`] of simulated time.
pub const FIRST_LEDGER: u64 = 1_454_282;
pub const LEDGER_CLOSE: Duration = Duration::from_secs(5);

/// Curve parameters (pump.fun's virtual reserves at launch).
const CURVE_SOL: i64 = 30;
const CURVE_TOKENS: i64 = 1_073_000_000;
const CURVE_MAX_SOL: i64 = 115;
const SOL_DP: u32 = 9;
const TOKEN_DP: u32 = 6;
/// Stellar amounts have 7 decimal places.
const STELLAR_DP: u32 = 7;
const ACCOUNT_POOL: usize = 8;
/// Scheduled offsets beyond this (about 100 years) mean "never".
const NEVER_NS: u64 = 100 * 365 * 86_400 * 1_000_000_000;
/// Pull of the random walks back to their anchor, per trade.
const WALK_REVERSION: f64 = 1e-4;

/// Assets of `payment` and `contract_event`, with their weights.
const EVENT_ASSETS: &[(&str, f64)] = &[
    ("USDC", 0.40),
    ("XLM", 0.35),
    ("EURC", 0.15),
    ("AQUA", 0.10),
];

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    /// Trades per second, summed over all symbols; 0 disables trades.
    pub trades_per_sec: f64,
    /// `payment` and `contract_event` events per second; 0 disables them.
    pub events_per_sec: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            trades_per_sec: DEFAULT_TRADES_PER_SEC,
            events_per_sec: DEFAULT_EVENTS_PER_SEC,
        }
    }
}

impl SimConfig {
    /// Checks the rates: finite, not negative, at most
    /// [`MAX_RATE_PER_SEC`]. [`SimFeed::new`] treats an invalid rate as 0.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("trades_per_sec", self.trades_per_sec),
            ("events_per_sec", self.events_per_sec),
        ] {
            if !rate.is_finite() || !(0.0..=MAX_RATE_PER_SEC).contains(&rate) {
                return Err(format!(
                    "sim {name} must be between 0 and {MAX_RATE_PER_SEC}, got {rate}"
                ));
            }
        }
        Ok(())
    }
}

/// The simulated market. It never reads the clock: the event loop passes
/// `now` to [`SimFeed::poll`] and asks [`SimFeed::next_due`] when to.
#[derive(Debug)]
pub struct SimFeed {
    rng: StdRng,
    start: Instant,
    start_unix_ms: i64,
    trades_per_sec: f64,
    events_per_sec: f64,
    /// Offsets from `start` of the next trade and the next other event, in
    /// nanoseconds; [`NEVER_NS`] when disabled.
    next_trade: u64,
    next_event: u64,
    instruments: Vec<Instrument>,
    accounts: Vec<String>,
    /// One token contract per entry of [`EVENT_ASSETS`].
    contracts: Vec<String>,
    trade_id: u64,
}

#[derive(Debug)]
struct Instrument {
    symbol: &'static str,
    asset_code: &'static str,
    weight: f64,
    model: Model,
}

#[derive(Debug)]
enum Model {
    Curve(BondingCurve),
    Walk(RandomWalk),
}

/// Constant-product curve; `tokens` is always `k / sol` rounded to the
/// token's 6 decimals, so `sol * tokens` equals `k` within that rounding and
/// does not drift.
#[derive(Debug)]
struct BondingCurve {
    sol: Decimal,
    tokens: Decimal,
    k: Decimal,
    min_sol: Decimal,
    max_sol: Decimal,
    price: Decimal,
}

#[derive(Debug)]
struct RandomWalk {
    price: f64,
    anchor: f64,
    /// Standard deviation of one step's log return.
    sigma: f64,
    qty_min: f64,
    qty_max: f64,
    qty_dp: u32,
    last: Decimal,
}

impl SimFeed {
    pub const DEFAULT_SYMBOL: &'static str = DEFAULT_SYMBOL;

    pub fn new(config: SimConfig, start: Instant, start_unix_ms: i64) -> SimFeed {
        let sane = |rate: f64| {
            if rate.is_finite() && rate > 0.0 {
                rate.min(MAX_RATE_PER_SEC)
            } else {
                0.0
            }
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        let accounts = (0..ACCOUNT_POOL)
            .map(|_| strkey(STRKEY_ACCOUNT, &random_bytes(&mut rng)))
            .collect();
        let contracts = EVENT_ASSETS
            .iter()
            .map(|_| strkey(STRKEY_CONTRACT, &random_bytes(&mut rng)))
            .collect();
        let mut feed = SimFeed {
            rng,
            start,
            start_unix_ms,
            trades_per_sec: sane(config.trades_per_sec),
            events_per_sec: sane(config.events_per_sec),
            next_trade: NEVER_NS,
            next_event: NEVER_NS,
            instruments: default_instruments(),
            accounts,
            contracts,
            trade_id: 0,
        };
        feed.next_trade = feed.after(0, feed.trades_per_sec);
        feed.next_event = feed.after(0, feed.events_per_sec);
        feed
    }

    /// When the next event is due. Far in the future (about 100 years) when
    /// both rates are 0.
    pub fn next_due(&self) -> Instant {
        let offset = self.next_trade.min(self.next_event).min(NEVER_NS);
        self.start
            .checked_add(Duration::from_nanos(offset))
            .unwrap_or_else(|| self.start + Duration::from_secs(86_400))
    }

    /// Everything due up to `now`, in time order, at most
    /// [`MAX_EVENTS_PER_POLL`] (the rest stays due). If the schedule is more
    /// than [`MAX_LAG`] behind `now`, it first skips ahead to `now - MAX_LAG`.
    pub fn poll(&mut self, now: Instant) -> Vec<Map<String, Value>> {
        let now_ns = nanos(now.saturating_duration_since(self.start));
        let lag_ns = nanos(MAX_LAG);
        if now_ns > lag_ns {
            let cutoff = now_ns - lag_ns;
            if self.next_trade.min(self.next_event) < cutoff {
                let behind = now_ns - self.next_trade.min(self.next_event);
                info!(
                    "sim feed fell {:.1}s behind (event loop stalled?); skipping ahead",
                    behind as f64 / 1e9
                );
                if self.next_trade < cutoff {
                    self.next_trade = self.after(cutoff, self.trades_per_sec);
                }
                if self.next_event < cutoff {
                    self.next_event = self.after(cutoff, self.events_per_sec);
                }
            }
        }
        let mut out = Vec::new();
        while out.len() < MAX_EVENTS_PER_POLL {
            let at = self.next_trade.min(self.next_event);
            if at > now_ns || at >= NEVER_NS {
                break;
            }
            if self.next_trade <= self.next_event {
                out.push(self.trade(at));
                self.next_trade = self.after(at, self.trades_per_sec);
            } else {
                out.push(self.other_event(at));
                self.next_event = self.after(at, self.events_per_sec);
            }
        }
        out
    }

    /// The simulated symbols, [`DEFAULT_SYMBOL`] first.
    pub fn symbols(&self) -> Vec<String> {
        self.instruments
            .iter()
            .map(|i| i.symbol.to_owned())
            .collect()
    }

    /// The price of `symbol`'s last trade (its starting price before any).
    pub fn last_price(&self, symbol: &str) -> Option<Decimal> {
        self.instruments
            .iter()
            .find(|i| i.symbol == symbol)
            .map(|i| match &i.model {
                Model::Curve(curve) => curve.price,
                Model::Walk(walk) => walk.last,
            })
    }

    /// The accounts that trade and pay, for examples and tests.
    pub fn account_ids(&self) -> &[String] {
        &self.accounts
    }

    /// The asset codes of trades and other events.
    pub fn asset_codes(&self) -> Vec<String> {
        let mut codes: Vec<String> = self
            .instruments
            .iter()
            .map(|i| i.asset_code.to_owned())
            .collect();
        codes.extend(EVENT_ASSETS.iter().map(|(code, _)| (*code).to_owned()));
        codes
    }

    /// The offset of the next arrival after `from` of a Poisson process at
    /// `rate` per second.
    fn after(&mut self, from: u64, rate: f64) -> u64 {
        if rate <= 0.0 {
            return NEVER_NS;
        }
        // 1 - [0, 1) is (0, 1]: ln never sees 0.
        let u = 1.0 - self.rng.random::<f64>();
        let gap = (-u.ln() / rate * 1e9).round() as u64; // saturates
        from.saturating_add(gap.max(1)).min(NEVER_NS)
    }

    fn ts(&self, at: u64) -> i64 {
        self.start_unix_ms + (at / 1_000_000) as i64
    }

    fn account(&mut self) -> String {
        let i = self.rng.random_range(0..self.accounts.len());
        self.accounts[i].clone()
    }

    /// Two different accounts.
    fn account_pair(&mut self) -> (String, String) {
        let n = self.accounts.len();
        let a = self.rng.random_range(0..n);
        let b = (a + self.rng.random_range(1..n)) % n;
        (self.accounts[a].clone(), self.accounts[b].clone())
    }

    fn trade(&mut self, at: u64) -> Map<String, Value> {
        let total: f64 = self.instruments.iter().map(|i| i.weight).sum();
        let mut pick = self.rng.random::<f64>() * total;
        let mut index = self.instruments.len() - 1;
        for (i, instrument) in self.instruments.iter().enumerate() {
            if pick < instrument.weight {
                index = i;
                break;
            }
            pick -= instrument.weight;
        }
        let ts = self.ts(at);
        let account_id = self.account();
        let rng = &mut self.rng;
        let instrument = &mut self.instruments[index];
        let (price, qty, side, notional) = match &mut instrument.model {
            Model::Curve(curve) => curve.trade(rng),
            Model::Walk(walk) => walk.trade(rng),
        };
        let (symbol, asset_code) = (instrument.symbol, instrument.asset_code);
        self.trade_id += 1;
        object(json!({
            "type": "trade",
            "symbol": symbol,
            "price": price.to_string(),
            "qty": qty.to_string(),
            "side": side,
            "ts": ts,
            "account_id": account_id,
            "asset_code": asset_code,
            "amount": qty.to_string(),
            "notional": notional.to_string(),
            "trade_id": self.trade_id,
        }))
    }

    fn other_event(&mut self, at: u64) -> Map<String, Value> {
        let ts = self.ts(at);
        let asset = weighted(&mut self.rng, EVENT_ASSETS);
        let amount = fixed(log_uniform(&mut self.rng, 0.5, 50_000.0), STELLAR_DP).to_string();
        let transaction_hash = hex(&random_bytes(&mut self.rng));
        if self.rng.random_bool(0.6) {
            let (from, to) = self.account_pair();
            return object(json!({
                "type": "payment",
                "from": from,
                "to": to,
                "asset_code": EVENT_ASSETS[asset].0,
                "amount": amount,
                "ts": ts,
                "transaction_hash": transaction_hash,
            }));
        }
        let code = EVENT_ASSETS[asset].0;
        let kind = self.rng.random::<f64>();
        let topics = if kind < 0.6 {
            let (from, to) = self.account_pair();
            json!(["transfer", from, to, code])
        } else if kind < 0.8 {
            let (admin, to) = self.account_pair();
            json!(["mint", admin, to, code])
        } else {
            json!(["burn", self.account(), code])
        };
        object(json!({
            "type": "contract_event",
            "ledger": FIRST_LEDGER + at / nanos(LEDGER_CLOSE),
            "transaction_hash": transaction_hash,
            "contract_id": self.contracts[asset],
            "topics": topics,
            "data": {"amount": amount},
            "ts": ts,
        }))
    }
}

impl BondingCurve {
    fn new() -> Self {
        let sol = Decimal::from(CURVE_SOL);
        let tokens = Decimal::from(CURVE_TOKENS);
        BondingCurve {
            sol,
            tokens,
            k: sol * tokens,
            min_sol: sol,
            max_sol: Decimal::from(CURVE_MAX_SOL),
            price: fixed_dec(sol / tokens, CURVE_PRICE_DP),
        }
    }

    /// Buys or sells a random amount of SOL: (price, tokens, side, SOL).
    fn trade(&mut self, rng: &mut StdRng) -> (Decimal, Decimal, &'static str, Decimal) {
        let size = fixed(log_uniform(rng, 0.001, 0.25), SOL_DP);
        let mut buy = rng.random_bool(0.5);
        if !buy && self.sol - size < self.min_sol {
            buy = true;
        } else if buy && self.sol + size > self.max_sol {
            buy = false;
        }
        self.sol = if buy {
            self.sol + size
        } else {
            self.sol - size
        };
        let tokens = fixed_dec(self.k / self.sol, TOKEN_DP);
        let qty = (self.tokens - tokens).abs();
        self.tokens = tokens;
        self.price = fixed_dec(self.sol / self.tokens, CURVE_PRICE_DP);
        (self.price, qty, if buy { "buy" } else { "sell" }, size)
    }
}

impl RandomWalk {
    fn new(anchor: f64, sigma: f64, qty_min: f64, qty_max: f64, qty_dp: u32) -> Self {
        RandomWalk {
            price: anchor,
            anchor,
            sigma,
            qty_min,
            qty_max,
            qty_dp,
            last: fixed(anchor, 2),
        }
    }

    fn trade(&mut self, rng: &mut StdRng) -> (Decimal, Decimal, &'static str, Decimal) {
        let step = self.sigma * gaussian(rng) - WALK_REVERSION * (self.price / self.anchor).ln();
        self.price = (self.price * step.exp()).max(0.01);
        let price = fixed(self.price, 2).max(Decimal::new(1, 2));
        let side = if price >= self.last { "buy" } else { "sell" };
        self.last = price;
        let qty = fixed(log_uniform(rng, self.qty_min, self.qty_max), self.qty_dp)
            .max(Decimal::new(1, self.qty_dp));
        (price, qty, side, fixed_dec(price * qty, 2))
    }
}

fn default_instruments() -> Vec<Instrument> {
    let walk = |symbol, asset_code, weight, anchor, sigma, qty_min, qty_max, qty_dp| Instrument {
        symbol,
        asset_code,
        weight,
        model: Model::Walk(RandomWalk::new(anchor, sigma, qty_min, qty_max, qty_dp)),
    };
    vec![
        Instrument {
            symbol: DEFAULT_SYMBOL,
            asset_code: "PUMP",
            weight: 0.40,
            model: Model::Curve(BondingCurve::new()),
        },
        walk("BTC-USD", "BTC", 0.25, 45_000.0, 0.0004, 0.0005, 1.5, 4),
        walk("ETH-USD", "ETH", 0.20, 2_500.0, 0.0005, 0.005, 25.0, 4),
        walk("SOL-USD", "SOL", 0.15, 150.0, 0.0007, 0.05, 300.0, 2),
    ]
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("json! of an object literal"),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `value` with exactly `dp` decimal places (rounded half away from zero).
fn fixed(value: f64, dp: u32) -> Decimal {
    let units = (value * 10f64.powi(dp as i32)).round() as i64;
    Decimal::new(units, dp)
}

fn fixed_dec(value: Decimal, dp: u32) -> Decimal {
    let mut d = value.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero);
    d.rescale(dp);
    d
}

fn log_uniform(rng: &mut StdRng, low: f64, high: f64) -> f64 {
    (low.ln() + rng.random::<f64>() * (high.ln() - low.ln())).exp()
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn weighted(rng: &mut StdRng, items: &[(&str, f64)]) -> usize {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random::<f64>() * total;
    for (i, (_, weight)) in items.iter().enumerate() {
        if pick < *weight {
            return i;
        }
        pick -= weight;
    }
    items.len() - 1
}

fn random_bytes(rng: &mut StdRng) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Strkey version bytes: `G…` account ids and `C…` contract ids.
const STRKEY_ACCOUNT: u8 = 6 << 3;
const STRKEY_CONTRACT: u8 = 2 << 3;

/// A Stellar strkey: base32 of version byte, 32-byte payload and CRC16
/// (XModem, little-endian); 56 characters.
fn strkey(version: u8, payload: &[u8; 32]) -> String {
    let mut raw = Vec::with_capacity(35);
    raw.push(version);
    raw.extend_from_slice(payload);
    let crc = crc16_xmodem(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    base32(&raw)
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// RFC 4648 base32 without padding.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const T0_MS: i64 = 1_748_465_400_000;

    fn feed(seed: u64) -> (SimFeed, Instant) {
        let start = Instant::now();
        let config = SimConfig {
            seed,
            ..SimConfig::default()
        };
        (SimFeed::new(config, start, T0_MS), start)
    }

    /// Polls every `step` for `span`, collecting everything.
    fn run(
        feed: &mut SimFeed,
        start: Instant,
        span: Duration,
        step: Duration,
    ) -> Vec<Map<String, Value>> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t < span {
            t += step;
            out.extend(feed.poll(start + t));
        }
        out
    }

    fn dec(event: &Map<String, Value>, field: &str) -> Decimal {
        Decimal::from_str(event[field].as_str().unwrap()).unwrap()
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different() {
        let (mut a, sa) = feed(42);
        let (mut b, sb) = feed(42);
        let (mut c, sc) = feed(43);
        let span = Duration::from_secs(60);
        let ea = run(&mut a, sa, span, Duration::from_millis(100));
        // Polled at other instants: the same events.
        let eb = run(&mut b, sb, span, Duration::from_millis(730));
        let ec = run(&mut c, sc, span, Duration::from_millis(100));
        let cut = ea.len().min(eb.len()) - 30;
        assert!(cut > 1000);
        assert_eq!(ea[..cut], eb[..cut]);
        assert_ne!(ea[..100], ec[..100]);
        assert_ne!(a.account_ids(), c.account_ids());
    }

    #[test]
    fn events_in_time_order_with_schedule_timestamps() {
        let (mut sim, start) = feed(7);
        let events = run(
            &mut sim,
            start,
            Duration::from_secs(30),
            Duration::from_millis(250),
        );
        let ts: Vec<i64> = events.iter().map(|e| e["ts"].as_i64().unwrap()).collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
        assert!(ts[0] >= T0_MS && *ts.last().unwrap() <= T0_MS + 30_000);
        assert!(sim.next_due() > start + Duration::from_secs(30) - Duration::from_millis(250));
    }

    #[test]
    fn curve_price_is_reserve_ratio_and_k_is_kept() {
        let (mut sim, start) = feed(1);
        let k = Decimal::from(CURVE_SOL) * Decimal::from(CURVE_TOKENS);
        let mut t = Duration::ZERO;
        let mut trades = 0;
        while trades < 2000 {
            t += Duration::from_millis(100);
            for event in sim.poll(start + t) {
                if event["type"] != "trade" || event["symbol"] != DEFAULT_SYMBOL {
                    continue;
                }
                trades += 1;
                let Model::Curve(curve) = &sim.instruments[0].model else {
                    panic!("PUMP-SOL is the curve");
                };
                // The last curve trade in this batch is the current state;
                // check the invariant on the state, and the event's fields.
                let price = dec(&event, "price");
                assert!(price > Decimal::ZERO);
                assert_eq!(price.scale(), CURVE_PRICE_DP);
                assert!(dec(&event, "qty") > Decimal::ZERO);
                assert_eq!(event["amount"], event["qty"]);
                assert_eq!(event["asset_code"], "PUMP");
                let drift = (curve.sol * curve.tokens - k).abs() / k;
                assert!(drift < Decimal::new(1, 12), "k drifted by {drift}");
                assert_eq!(
                    curve.price,
                    fixed_dec(curve.sol / curve.tokens, CURVE_PRICE_DP)
                );
                assert!(curve.sol >= curve.min_sol && curve.sol <= curve.max_sol);
            }
        }
    }

    #[test]
    fn each_curve_trade_moves_reserves_consistently() {
        // Drive the curve directly: each trade's price is the ratio after it.
        let mut curve = BondingCurve::new();
        let mut rng = StdRng::seed_from_u64(9);
        let k = curve.k;
        for _ in 0..10_000 {
            let (sol_before, tokens_before) = (curve.sol, curve.tokens);
            let (price, qty, side, size) = curve.trade(&mut rng);
            assert_eq!(price, fixed_dec(curve.sol / curve.tokens, CURVE_PRICE_DP));
            assert!(price > Decimal::ZERO);
            assert!((curve.sol * curve.tokens - k).abs() / k < Decimal::new(1, 12));
            assert_eq!(qty, (tokens_before - curve.tokens).abs());
            match side {
                "buy" => assert_eq!(curve.sol, sol_before + size),
                _ => assert_eq!(curve.sol, sol_before - size),
            }
        }
    }

    #[test]
    fn random_walk_prices_positive_two_decimals_near_anchor() {
        let (mut sim, start) = feed(3);
        let events = run(
            &mut sim,
            start,
            Duration::from_secs(3600),
            Duration::from_secs(1),
        );
        let anchors = [
            ("BTC-USD", 45_000.0),
            ("ETH-USD", 2_500.0),
            ("SOL-USD", 150.0),
        ];
        for (symbol, anchor) in anchors {
            let prices: Vec<Decimal> = events
                .iter()
                .filter(|e| e["type"] == "trade" && e["symbol"] == symbol)
                .map(|e| dec(e, "price"))
                .collect();
            assert!(prices.len() > 5000, "{symbol}: {}", prices.len());
            for p in &prices {
                assert!(*p > Decimal::ZERO);
                assert_eq!(p.scale(), 2);
                let f: f64 = p.to_string().parse().unwrap();
                assert!((f / anchor - 1.0).abs() < 0.5, "{symbol} wandered to {f}");
            }
        }
    }

    #[test]
    fn rates_are_right_over_an_hour() {
        let (mut sim, start) = feed(11);
        let events = run(
            &mut sim,
            start,
            Duration::from_secs(3600),
            Duration::from_millis(500),
        );
        let trades = events.iter().filter(|e| e["type"] == "trade").count() as f64;
        let others = events.len() as f64 - trades;
        let expect_trades = DEFAULT_TRADES_PER_SEC * 3600.0;
        let expect_others = DEFAULT_EVENTS_PER_SEC * 3600.0;
        assert!(
            (trades / expect_trades - 1.0).abs() < 0.05,
            "{trades} trades"
        );
        assert!(
            (others / expect_others - 1.0).abs() < 0.05,
            "{others} other events"
        );
        // Each symbol trades.
        for symbol in sim.symbols() {
            assert!(events
                .iter()
                .any(|e| e.get("symbol").and_then(Value::as_str) == Some(symbol.as_str())));
        }
    }

    #[test]
    fn poll_is_bounded_and_the_rest_stays_due() {
        let start = Instant::now();
        let config = SimConfig {
            seed: 5,
            trades_per_sec: 1000.0,
            events_per_sec: 0.0,
        };
        let mut sim = SimFeed::new(config, start, T0_MS);
        // 5 s at 1000/s, within MAX_LAG: about 5000 due.
        let now = start + Duration::from_secs(5);
        let first = sim.poll(now);
        assert_eq!(first.len(), MAX_EVENTS_PER_POLL);
        assert!(sim.next_due() <= now);
        let mut total = first.len();
        loop {
            let batch = sim.poll(now);
            assert!(batch.len() <= MAX_EVENTS_PER_POLL);
            if batch.is_empty() {
                break;
            }
            total += batch.len();
        }
        assert!((4500..5500).contains(&total), "{total}");
        assert!(sim.next_due() > now);
    }

    #[test]
    fn a_long_stall_skips_ahead() {
        let (mut sim, start) = feed(5);
        let now = start + Duration::from_secs(3600);
        let mut events = Vec::new();
        loop {
            let batch = sim.poll(now);
            if batch.is_empty() {
                break;
            }
            events.extend(batch);
        }
        // Only the last MAX_LAG (10 s at 24/s) is generated.
        assert!(events.len() < 400, "{}", events.len());
        let first_ts = events[0]["ts"].as_i64().unwrap();
        assert!(first_ts >= T0_MS + 3_590_000);
    }

    #[test]
    fn zero_rates_produce_nothing() {
        let start = Instant::now();
        let config = SimConfig {
            seed: 1,
            trades_per_sec: 0.0,
            events_per_sec: f64::NAN,
        };
        assert!(config.validate().is_err());
        let mut sim = SimFeed::new(config, start, T0_MS);
        assert!(sim.poll(start + Duration::from_secs(5)).is_empty());
        assert!(sim.next_due() > start + Duration::from_secs(86_400));
        assert!(SimConfig::default().validate().is_ok());
    }

    #[test]
    fn events_carry_the_fields_filters_use() {
        let (mut sim, start) = feed(8);
        let events = run(
            &mut sim,
            start,
            Duration::from_secs(120),
            Duration::from_secs(1),
        );
        let accounts = sim.account_ids().to_vec();
        assert_eq!(accounts.len(), ACCOUNT_POOL);
        for id in &accounts {
            assert_eq!(id.len(), 56);
            assert!(id.starts_with('G'));
        }
        let mut kinds = std::collections::BTreeMap::new();
        let mut ledger = 0;
        let mut big = 0;
        for e in &events {
            let kind = e["type"].as_str().unwrap();
            *kinds.entry(kind.to_owned()).or_insert(0) += 1;
            assert!(e["ts"].as_i64().is_some());
            match kind {
                "trade" => {
                    assert!(accounts.contains(&e["account_id"].as_str().unwrap().to_owned()));
                    assert!(e["asset_code"].is_string());
                    for f in ["price", "qty", "amount", "notional"] {
                        assert!(dec(e, f) > Decimal::ZERO, "{f}");
                    }
                    assert!(e["side"] == "buy" || e["side"] == "sell");
                }
                "payment" => {
                    let from = e["from"].as_str().unwrap().to_owned();
                    let to = e["to"].as_str().unwrap().to_owned();
                    assert!(accounts.contains(&from) && accounts.contains(&to));
                    assert_ne!(from, to);
                    let amount = dec(e, "amount");
                    assert_eq!(amount.scale(), STELLAR_DP);
                    if amount >= Decimal::from(100) {
                        big += 1;
                    }
                    assert!(EVENT_ASSETS.iter().any(|(c, _)| e["asset_code"] == *c));
                    assert_eq!(e["transaction_hash"].as_str().unwrap().len(), 64);
                }
                "contract_event" => {
                    let l = e["ledger"].as_u64().unwrap();
                    assert!(l >= ledger && l >= FIRST_LEDGER);
                    ledger = l;
                    let hash = e["transaction_hash"].as_str().unwrap();
                    assert_eq!(hash.len(), 64);
                    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
                    let contract = e["contract_id"].as_str().unwrap();
                    assert!(contract.starts_with('C') && contract.len() == 56);
                    assert!(e["topics"].as_array().is_some_and(|t| !t.is_empty()));
                    assert!(e["data"]["amount"].is_string());
                }
                other => panic!("unexpected type {other}"),
            }
        }
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        assert!(big > 10, "some payments pass min_amount 100");
        assert!(ledger > FIRST_LEDGER, "ledgers advance");
        // Key order of a trade, as documented.
        let trade = events.iter().find(|e| e["type"] == "trade").unwrap();
        let keys: Vec<&str> = trade.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "type",
                "symbol",
                "price",
                "qty",
                "side",
                "ts",
                "account_id",
                "asset_code",
                "amount",
                "notional",
                "trade_id"
            ]
        );
    }

    #[test]
    fn strkeys_are_well_formed() {
        // The all-zero account key is a well-known strkey.
        assert_eq!(
            strkey(STRKEY_ACCOUNT, &[0; 32]),
            "GAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAWHF"
        );
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn symbols_start_with_the_default() {
        let (sim, _) = feed(0);
        assert_eq!(sim.symbols(), ["PUMP-SOL", "BTC-USD", "ETH-USD", "SOL-USD"]);
        assert_eq!(SimFeed::DEFAULT_SYMBOL, DEFAULT_SYMBOL);
        assert!(sim.last_price("BTC-USD").unwrap() == Decimal::new(4_500_000, 2));
        assert!(sim.last_price("NOPE").is_none());
    }
}
