import ArgumentParser
import GMemBackend
import GMemKernel
import GMemModel
import GMemScenario

@main
struct GMem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gmem",
        abstract: "Linux KVM guest_memfd, executable in user space.",
        discussion: """
            With no subcommand, gmem runs the demo: a confidential VM's I/O life end to end,
            on the model and, where /dev/kvm opens, on the real kernel.
            """,
        subcommands: [Demo.self, Tour.self, Run.self, Explore.self, Fuzz.self, Probe.self, Compare.self],
        defaultSubcommand: Demo.self)
}

enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case model, kernel, both
}

enum ModelProfile: String, ExpressibleByArgument, CaseIterable {
    case mainline
    case linux618 = "linux-6.18"
    case linux612 = "linux-6.12"
    case next
    case pvmHost = "pvm-host"

    var config: ModelConfig {
        switch self {
        case .mainline, .linux618: .mainline
        case .linux612: .linux612
        case .next: .next
        case .pvmHost: .pvmHost
        }
    }
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Where steps run: model, kernel, or both (compared).")
    var backend: BackendChoice = .model

    @Option(name: .customLong("model-config"), help: "Which kernel the model answers as: mainline or linux-6.18 (x86 6.18, TDP, sw_protected VMs), linux-6.12 (the LTS: no MMAP/INIT_SHARED guest_memfd flags), next (mainline plus NO_DIRECT_MAP) or pvm-host (this project's hosts: 6.18 on kvm-pvm, with its measured quirks and bugs); docs/profiles.md.")
    var modelConfig: ModelProfile = .mainline

    @Option(name: .customLong("mutant"), help: "Run the model with a deliberate bug (\(Mutant.allCases.map(\.rawValue).joined(separator: ", "))); repeatable.")
    var mutants: [Mutant] = []

    @Option(name: .customLong("memory-budget"), help: "Bytes the kernel backend may make the real kernel allocate per scenario (default: a quarter of MemAvailable, at most 8G); steps over it are refused and skipped.")
    var memoryBudget: String?

    @Option(name: .customLong("max-transfer"), help: "The most bytes one step may return, on either backend (default 1G); larger reads are refused and skipped.")
    var maxTransfer: String?

    func size(_ text: String?, _ flag: String) throws -> UInt64? {
        guard let text else { return nil }
        guard let v = NumberSyntax.parse(text) else { throw ValidationError("\(flag): expected a size such as 512M or 4G, got \(text)") }
        return v
    }

    /// The model configuration the options choose (profile, mutants, limits).
    func configured(_ base: ModelConfig) throws -> ModelConfig {
        var c = base
        c.mutants = Set(mutants)
        if let t = try size(maxTransfer, "--max-transfer") { c.transferLimit = t }
        return c
    }

    /// Something that runs scenarios: one backend, or two compared step by step.
    struct Executor {
        var name: String
        var run: (Scenario, (StepReport) -> Void) -> Summary
    }

    /// A fresh executor for one scenario, or exit 3 saying why the backend is unavailable.
    func makeExecutor() throws -> Executor {
        switch backend {
        case .model:
            let r = ScenarioRunner(backend: ModelBackend(config: try configured(modelConfig.config), checkTransitions: true))
            return Executor(name: "model") { r.run($0, report: $1) }
        case .kernel:
            let r = ScenarioRunner(backend: try kernelBackend())
            return Executor(name: "kernel") { r.run($0, report: $1) }
        case .both:
            let kernel = try kernelBackend()
            let model = ModelBackend(config: try configured(modelConfigMatching(kernel)), checkTransitions: true)
            let d = DifferentialRunner(model, kernel)
            return Executor(name: d.name) { d.run($0, report: $1) }
        }
    }

    /// Fresh backends for one run: the model alone, the kernel alone, or the model
    /// and the kernel (in that order) to be compared.
    func makeBackends() throws -> [any Backend] {
        switch backend {
        case .model: return [ModelBackend(config: try configured(modelConfig.config), checkTransitions: true)]
        case .kernel: return [try kernelBackend()]
        case .both:
            let kernel = try kernelBackend()
            return [ModelBackend(config: try configured(modelConfigMatching(kernel)), checkTransitions: true), kernel]
        }
    }

    /// Puts this process in a memory cgroup of its own once, limited to the kernel
    /// budget plus 4 GiB for the process itself (the model, the runtime), and says so
    /// on standard error; without a writable memory controller, says that.
    static func confine(budget: UInt64) {
        #if os(Linux)
        guard !CgroupNote.printed else { return }
        CgroupNote.printed = true
        let limit = budget &+ (4 << 30)
        switch MemoryCgroup.enter(limit: limit) {
        case .success(let dir): emitError("gmem: the kernel side runs in memory cgroup \(dir), limited to \(limit >> 20) MiB")
        case .failure(let p): emitError("gmem: no memory cgroup for the kernel side (\(p.message)); the memory budget alone guards it")
        }
        #endif
    }

    /// With `both`, the model stands for the host it is compared with (unless
    /// --model-config was given): same VM types, attributes and paging mode.
    func modelConfigMatching(_ kernel: any Backend) -> ModelConfig {
        #if os(Linux)
        if !modelConfigGiven, let k = kernel as? KernelBackend {
            return .standing(for: k.hostProfile)
        }
        #endif
        return modelConfig.config
    }

    var modelConfigGiven: Bool { CommandLine.arguments.contains { $0.hasPrefix("--model-config") } }

    /// The kernel backend, or exit 3 saying why /dev/kvm cannot be used.
    func kernelBackend() throws -> any Backend {
        #if os(Linux)
        do {
            let k = try KernelBackend()
            if let b = try size(memoryBudget, "--memory-budget") { k.budget = MemoryBudget(limit: b) }
            if let t = try size(maxTransfer, "--max-transfer") { k.transferLimit = t }
            Self.confine(budget: k.budget.limit)
            return k
        } catch let error as BackendError {
            if case .unsupported(let why) = error {
                emitError("gmem: the kernel backend is unavailable: \(why)")
            } else {
                emitError("gmem: the kernel backend is unavailable: \(error)")
            }
            throw ExitCode(3)
        }
        #else
        emitError("gmem: the kernel backend needs Linux and /dev/kvm")
        throw ExitCode(3)
        #endif
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run scenario files and check every expectation.",
        discussion: """
            Exit status: 0 every expectation held; 1 an expectation failed or (with both) the \
            backends disagreed; 2 a file is not a valid scenario; 3 the backend is unavailable. \
            A directory runs its *.json files.
            """)

    @OptionGroup var options: BackendOptions

    @Flag(help: "One JSON object per step, then a summary object.")
    var json = false

    @Flag(name: .shortAndLong, help: "Only step lines and summaries: no descriptions or comments.")
    var quiet = false

    @Argument(help: "Scenario files or directories.")
    var files: [String]

    @Option(help: "Run inside a reference kernel booted under qemu (linux-6.12; build it with scripts/reference-kernel build).")
    var on: String?

    func run() throws {
        if let on { try ReferenceKernel.relay(on) }
        var scenarios: [Scenario] = []
        var invalid = false
        for path in expandScenarioPaths(files) {
            switch readTextFile(path) {
            case .failure(let p):
                emitError("\(path): cannot read: \(p.message)")
                invalid = true
            case .success(let text):
                do {
                    scenarios.append(try ScenarioParser.parse(text: text, file: path))
                } catch {
                    emitError("\(error)")
                    invalid = true
                }
            }
        }
        if invalid { throw ExitCode(2) }
        let reporter = Reporter(json: json)
        reporter.verbose = !quiet
        var total = Summary()
        for scenario in scenarios {
            // Each scenario starts from a fresh system.
            let executor = try options.makeExecutor()
            reporter.header(scenario, backend: executor.name)
            var stepsByIndex: [Int: Step] = [:]
            for s in scenario.steps { stepsByIndex[s.index] = s }
            let summary = executor.run(scenario) { r in reporter.step(r, stepsByIndex[r.index]!, file: scenario.file) }
            reporter.fileSummary(scenario, summary)
            total.add(summary)
        }
        reporter.total(total)
        if total.failed > 0 { throw ExitCode(1) }
    }
}

struct Tour: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Walk through guest_memfd's behaviour with the bundled scenarios (the default).")

    @OptionGroup var options: BackendOptions

    func run() throws {
        emit("""
            GuestMemfd: the Linux KVM guest_memfd system, executable in user space.

            The tour runs the scenarios bundled into this binary on the \(options.backend.rawValue) \
            backend. Each line is one uapi call: step, op, result, and what it returned. Every \
            result is checked against the errno, bytes or exit the kernel gives.

            """)
        var total = Summary()
        let reporter = Reporter(json: false)
        for (file, text) in TourScenarios.all {
            let scenario: Scenario
            do {
                scenario = try ScenarioParser.parse(text: text, file: file)
            } catch {
                emitError("gmem: bundled scenario is invalid: \(error)")
                throw ExitCode(2)
            }
            let executor = try options.makeExecutor()
            reporter.header(scenario, backend: executor.name)
            var stepsByIndex: [Int: Step] = [:]
            for s in scenario.steps { stepsByIndex[s.index] = s }
            let summary = executor.run(scenario) { r in reporter.step(r, stepsByIndex[r.index]!, file: file) }
            reporter.fileSummary(scenario, summary)
            total.add(summary)
        }
        emit("Tour: every step checked against the kernel's documented behaviour.")
        emit("Run the conformance suite with: swift run gmem run scenarios/")
        reporter.total(total)
        if total.failed > 0 { throw ExitCode(1) }
    }
}

extension Mutant: ExpressibleByArgument {}

/// Whether the memory-cgroup line has been printed (once a process).
enum CgroupNote {
    nonisolated(unsafe) static var printed = false
}
