import ArgumentParser
import GMemBackend
import GMemModel
import GMemScenario

enum ExploreStrategy: String, ExpressibleByArgument, CaseIterable {
    case exhaustive, random, pct
}

struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a scenario's actors in every interleaving, checking the invariants after each step.",
        discussion: """
            The file's steps set the system up once; its actors' programs are then interleaved \
            (docs/explorer.md). A violation prints the schedule, the labelled trace and the command \
            that replays it. Exit status: 0 no violation; 1 a violation or livelock; 2 the file is \
            not valid or its setup failed.
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

    @Option(name: .customLong("mutant"), help: "A deliberate bug (\(Mutant.allCases.map(\.rawValue).joined(separator: ", "))); repeatable.")
    var mutants: [Mutant] = []

    @Option(help: "Print progress to stderr every this many steps (0: never).")
    var progress = 100_000

    @Argument(help: "A scenario file with actors.")
    var file: String

    func run() throws {
        let scenario: Scenario
        switch readTextFile(file) {
        case .failure(let p):
            emitError("\(file): cannot read: \(p.message)")
            throw ExitCode(2)
        case .success(let text):
            do { scenario = try ScenarioParser.parse(text: text, file: file) } catch {
                emitError("\(error)")
                throw ExitCode(2)
            }
        }
        guard !scenario.actors.isEmpty else {
            emitError("\(file): field 'actors': missing or empty (gmem explore needs actors to interleave)")
            throw ExitCode(2)
        }
        var config = modelConfig.config
        config.mutants = Set(mutants)
        let r = ExploreRunner(scenario, config: config)
        for f in r.setupFailures {
            emitError("\(file): step \(f.index) (\(f.op)): setup failed: \(f.message ?? f.status.rawValue)")
        }
        if !r.setupFailures.isEmpty { throw ExitCode(2) }
        var e = r.explorer
        if progress > 0 {
            e.progressEvery = progress
            e.onProgress = { s in emitError("  ... \(s.steps) steps, \(s.schedules) schedules, \(s.states) distinct states") }
        }
        print("\(scenario.name): \(e.actors.count) actors (\(e.actors.map { "\($0.name): \($0.steps.count) steps" }.joined(separator: ", ")))")

        if let text = replay {
            guard let schedule = Schedule(parsing: text) else {
                emitError("--replay: expected actor indices joined by dots, such as 0.1.0, got \"\(text)\"")
                throw ExitCode(2)
            }
            let result = e.replay(schedule)
            print("replay \(schedule):")
            for t in result.trace { print("  \(t)") }
            for v in result.violations { print("  VIOLATION \(v)") }
            if !result.violations.isEmpty { throw ExitCode(1) }
            print("  no violation")
            return
        }

        let t0 = monotonicSeconds()
        if depth < 1 {
            emitError("--depth: expected at least 1, got \(depth)")
            throw ExitCode(2)
        }
        let summary = switch strategy {
        case .exhaustive: e.exhaustive(preemptionBound: preemptionBound)
        case .random: e.random(seed: seed, count: schedules)
        case .pct: e.pct(seed: seed, depth: depth, count: schedules)
        }
        let seconds = monotonicSeconds() - t0
        let how = switch strategy {
        case .exhaustive: "exhaustive, preemption bound \(preemptionBound)"
        case .random: "random, seed \(seed)"
        case .pct: "PCT, depth \(depth), seed \(seed)"
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
        let mutantFlags = mutants.map { " --mutant \($0.rawValue)" }.joined()
        print("replay: gmem explore\(mutantFlags) --replay \(c.schedule) \(file)")
        throw ExitCode(1)
    }
}
