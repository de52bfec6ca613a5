import ArgumentParser
import GMemBackend
import GMemModel
import GMemScenario

enum ExploreStrategy: String, ExpressibleByArgument, CaseIterable {
    case exhaustive, random, pct
}

struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run scenarios' actors in every interleaving, checking the invariants after each step.",
        discussion: """
            A file's steps set the system up once; its actors' programs are then interleaved \
            (docs/explorer.md). A file without actors runs its steps as one actor, every invariant \
            checked after every step. A violation prints the schedule, the labelled trace and the \
            command that replays it; with several files each gets one line. Exit status: 0 no \
            violation; 1 a violation, livelock or deadlock (or, with --mutants, a mutant not caught); \
            2 a file is not valid or its setup failed.
            """)

    @Option(help: "exhaustive (depth-first, bounded preemptions), random (seeded) or pct (seeded, with --depth).")
    var strategy: ExploreStrategy = .exhaustive

    @Option(name: .customLong("preemption-bound"), help: "Most preemptions per schedule (exhaustive).")
    var preemptionBound = 2

    @Option(help: "Seed for random schedules.")
    var seed: UInt64 = 1

    @Option(help: "How many random or PCT schedules.")
    var schedules = 1000

    @Option(help: "PCT's bug depth: how many ordering constraints the bug needs (priority change points + 1).")
    var depth = 3

    @Option(help: "Run exactly this schedule (actor indices joined by dots, as a violation prints it).")
    var replay: String?

    @Option(name: .customLong("model-config"), help: "mainline, next or pvm-host.")
    var modelConfig: ModelProfile = .mainline

    @Option(name: .customLong("mutant"), help: "Run the model with a deliberate bug; repeatable.")
    var mutants: [Mutant] = []

    @Option(help: "Print progress to stderr every this many steps (0: never).")
    var progress = 100_000

    @Flag(name: .customLong("mutants"), help: """
        Run every mutant each file says it catches (its "catches" list) under the exhaustive \
        search and print a table; fail if one goes unnoticed or some mutant has no file.
        """)
    var sweep = false

    @Flag(help: "Print JSON lines instead: one object per file (or per mutant), then a summary.")
    var json = false

    @Argument(help: "Scenario files, or directories of them. A file's actors are interleaved; a file without actors runs its steps as one actor.")
    var files: [String]

    func run() throws {
        let paths = expandScenarioPaths(files)
        var scenarios: [Scenario] = []
        for path in paths {
            switch readTextFile(path) {
            case .failure(let p):
                emitError("\(path): cannot read: \(p.message)")
                throw ExitCode(2)
            case .success(let text):
                do { scenarios.append(try ScenarioParser.parse(text: text, file: path)) } catch {
                    emitError("\(error)")
                    throw ExitCode(2)
                }
            }
        }
        if depth < 1 {
            emitError("--depth: expected at least 1, got \(depth)")
            throw ExitCode(2)
        }
        if sweep { return try sweepMutants(scenarios) }
        if scenarios.count == 1 { return try explore(scenarios[0]) }
        if replay != nil {
            emitError("--replay: give exactly one file (got \(scenarios.count))")
            throw ExitCode(2)
        }
        try exploreAll(scenarios)
    }

    var config: ModelConfig {
        var c = modelConfig.config
        c.mutants = Set(mutants)
        return c
    }

    var how: String {
        switch strategy {
        case .exhaustive: "exhaustive, preemption bound \(preemptionBound)"
        case .random: "random, seed \(seed)"
        case .pct: "PCT, depth \(depth), seed \(seed)"
        }
    }

    func search(_ e: Explorer) -> ExploreSummary {
        switch strategy {
        case .exhaustive: e.exhaustive(preemptionBound: preemptionBound)
        case .random: e.random(seed: seed, count: schedules)
        case .pct: e.pct(seed: seed, depth: depth, count: schedules)
        }
    }

    /// The runner for `scenario` (check its `skipReason`); exit status 2 when the
    /// setup failed.
    func runner(_ scenario: Scenario) throws -> ExploreRunner {
        let r = ExploreRunner(scenario, config: config)
        for f in r.setupFailures {
            emitError("\(scenario.file): step \(f.index) (\(f.op)): setup failed: \(f.message ?? f.status.rawValue)")
        }
        if !r.setupFailures.isEmpty { throw ExitCode(2) }
        return r
    }

    func explore(_ scenario: Scenario) throws {
        let r = try runner(scenario)
        if let why = r.skipReason {
            if json { emit(JSON.object(JSONObject(["file": .string(scenario.file), "result": .string("skipped"), "reason": .string(why)])).rendered) }
            else { print("\(scenario.name): skipped: \(why)") }
            return
        }
        var e = r.explorer
        if progress > 0 {
            e.progressEvery = progress
            e.onProgress = { s in emitError("  ... \(s.steps) steps, \(s.schedules) schedules, \(s.states) distinct states") }
        }
        if !json {
            print("\(scenario.name): \(e.actors.count) actors (\(e.actors.map { "\($0.name): \($0.steps.count) steps" }.joined(separator: ", ")))")
        }

        if let text = replay {
            guard let schedule = Schedule(parsing: text) else {
                emitError("--replay: expected actor indices joined by dots, such as 0.1.0, got \"\(text)\"")
                throw ExitCode(2)
            }
            let result = e.replay(schedule)
            if json {
                emit(JSON.object(JSONObject([
                    "file": .string(scenario.file), "replay": .string(schedule.description),
                    "result": .string(result.violations.isEmpty ? "no_violation" : "violation"),
                    "trace": .array(result.trace.map(\.json)), "violations": .array(result.violations.map(\.json)),
                ])).rendered)
            } else {
                print("replay \(schedule):")
                for t in result.trace { print("  \(t)") }
                for v in result.violations { print("  VIOLATION \(v)") }
                if result.violations.isEmpty { print("  no violation") }
            }
            if !result.violations.isEmpty { throw ExitCode(1) }
            return
        }

        let t0 = monotonicSeconds()
        let summary = search(e)
        let seconds = monotonicSeconds() - t0
        if json {
            emit(JSON.object(fileObject(scenario, actors: e.actors.map(\.name), summary, seconds: seconds)).rendered)
            if summary.counterexample != nil { throw ExitCode(1) }
            return
        }
        print("\(how): \(summary.schedules) schedules, \(summary.states) distinct states, \(summary.steps) steps in \((seconds * 1000).rounded() / 1000) s (\(Int(Double(summary.steps) / max(seconds, 1e-9))) steps/s)")
        guard let c = summary.counterexample else {
            print("no violation")
            return
        }
        print(c.livelock ? "LIVELOCK: schedule \(c.schedule) reached the step bound"
              : c.deadlock ? "DEADLOCK: schedule \(c.schedule) leaves every remaining actor blocked" : "VIOLATION: schedule \(c.schedule)")
        for t in c.trace { print("  \(t)") }
        for v in c.violations { print("  \(v)") }
        print("replay: \(replayCommand(c, scenario))")
        throw ExitCode(1)
    }

    func replayCommand(_ c: Counterexample, _ scenario: Scenario) -> String {
        let mutantFlags = mutants.map { " --mutant \($0.rawValue)" }.joined()
        return "gmem explore\(mutantFlags) --replay \(c.schedule) \(scenario.file)"
    }

    /// One file's exploration as a JSON object (`--json`).
    func fileObject(_ scenario: Scenario, actors: [String], _ summary: ExploreSummary, seconds: Double) -> JSONObject {
        var o = JSONObject([
            "file": .string(scenario.file), "strategy": .string(strategy.rawValue),
            "actors": .array(actors.map { .string($0) }),
            "schedules": .int(summary.schedules), "states": .int(summary.states), "steps": .int(summary.steps),
            "seconds": .number(format6(seconds)),
        ])
        switch strategy {
        case .exhaustive: o["preemption_bound"] = .int(preemptionBound)
        case .random: o["seed"] = .int(seed)
        case .pct: (o["seed"], o["depth"]) = (.int(seed), .int(depth))
        }
        guard let c = summary.counterexample else {
            o["result"] = .string("no_violation")
            return o
        }
        o["result"] = .string(c.livelock ? "livelock" : c.deadlock ? "deadlock" : "violation")
        o["schedule"] = .string(c.schedule.description)
        o["trace"] = .array(c.trace.map(\.json))
        o["violations"] = .array(c.violations.map(\.json))
        o["replay"] = .string(replayCommand(c, scenario))
        return o
    }

    /// Several files: one line each, then the totals.
    func exploreAll(_ scenarios: [Scenario]) throws {
        var total = ExploreSummary()
        var failed = 0, skipped = 0
        let t0 = monotonicSeconds()
        for s in scenarios {
            let r = try runner(s)
            if let why = r.skipReason {
                skipped += 1
                if json { emit(JSON.object(JSONObject(["file": .string(s.file), "result": .string("skipped"), "reason": .string(why)])).rendered) }
                else { emit("\(s.file): skipped: \(why)") }
                continue
            }
            let t = monotonicSeconds()
            let summary = search(r.explorer)
            let seconds = monotonicSeconds() - t
            total.schedules += summary.schedules
            total.states += summary.states
            total.steps += summary.steps
            if summary.counterexample != nil { failed += 1 }
            if json {
                emit(JSON.object(fileObject(s, actors: r.explorer.actors.map(\.name), summary, seconds: seconds)).rendered)
                continue
            }
            let actors = r.explorer.actors.count
            var line = "\(s.file): \(actors) actor\(actors == 1 ? "" : "s"), \(summary.schedules) schedules, \(summary.states) states, \(summary.steps) steps, \((seconds * 10_000).rounded() / 10) ms: "
            if let c = summary.counterexample {
                let what = c.livelock ? "LIVELOCK" : c.deadlock ? "DEADLOCK" : "VIOLATION \(c.violations.first.map { "\($0)" } ?? "")"
                line += "\(what) (schedule \(c.schedule); replay with --replay \(c.schedule) \(s.file))"
            } else {
                line += "no violation"
            }
            emit(line)
        }
        let seconds = monotonicSeconds() - t0
        if json {
            emit(JSON.object(JSONObject(["summary": .object(JSONObject([
                "files": .int(scenarios.count - skipped), "schedules": .int(total.schedules), "states": .int(total.states),
                "steps": .int(total.steps), "seconds": .number(format6(seconds)), "violations": .int(failed), "skipped": .int(skipped),
            ]))])).rendered)
        } else {
            emit("\(how): \(scenarios.count - skipped) files, \(total.schedules) schedules, \(total.states) distinct states, \(total.steps) steps in \((seconds * 100).rounded() / 100) s; \(failed) with a violation, \(skipped) skipped")
        }
        if failed > 0 { throw ExitCode(1) }
    }

    /// `--mutants`: each file's declared mutants, caught or not, as a markdown table
    /// (or JSON lines).
    func sweepMutants(_ scenarios: [Scenario]) throws {
        let results = MutantSweep.run(scenarios, preemptionBound: preemptionBound, config: modelConfig.config)
        let missed = results.filter { !$0.caught }
        let uncovered = MutantSweep.uncovered(scenarios)
        let slow = results.filter { $0.seconds > 10 }
        let caught = Set(results.filter(\.caught).map(\.mutant)).count
        if json {
            for r in results { emit(r.json.rendered) }
            emit(JSON.object(JSONObject(["summary": .object(JSONObject([
                "mutants": .int(Mutant.allCases.count), "caught": .int(caught), "preemption_bound": .int(preemptionBound),
                "uncovered": .array(uncovered.map { .string($0.rawValue) }),
                "slowest_seconds": .number(format6(results.map(\.seconds).max() ?? 0)),
            ]))])).rendered)
        } else {
            emit("| mutant | file | schedules until caught | states | time | schedule |")
            emit("|---|---|---|---|---|---|")
            for r in results {
                let name = r.file.split(separator: "/").last.map(String.init) ?? r.file
                let ms = r.seconds * 1000
                let time = ms < 10 ? "\((ms * 10).rounded() / 10) ms" : "\(Int(ms.rounded())) ms"
                emit("| `\(r.mutant.rawValue)` | \(name) | \(r.schedules) | \(r.states) | \(time) | \(r.schedule.map { "`\($0)`" } ?? "**not caught**") |")
            }
            emit("\(caught) of \(Mutant.allCases.count) mutants caught (exhaustive, preemption bound \(preemptionBound)); slowest \(((results.map(\.seconds).max() ?? 0) * 1000).rounded()) ms")
        }
        for m in missed { emitError("\(m.file): \(m.mutant.rawValue) went unnoticed (\(m.schedules) schedules)") }
        for m in uncovered { emitError("\(m.rawValue): no file lists it in \"catches\"") }
        for m in slow { emitError("\(m.file): \(m.mutant.rawValue) took \(m.seconds) s (over 10 s)") }
        if !missed.isEmpty || !uncovered.isEmpty || !slow.isEmpty { throw ExitCode(1) }
    }
}
