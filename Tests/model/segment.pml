/* A model of a segment's memory protocol (docs/LAYOUT.md), checked with spin:
 *
 *   one writer that publishes versions 1..MAXV into SLOTS rotating slots, and may crash and be
 *   restarted at any step (the restarted owner continues from latestVersion, and its backstop
 *   wakes every futex waiter, as the real one does within 250 ms);
 *   two readers running the seqlock read of "How to read";
 *   one sleeper waiting for a version after the first, counted on the wait board ("Waiting for a
 *   new version"), whose FUTEX_WAIT sleeps only while the futex word still holds what it loaded.
 *
 * Checked (Tests/model/check.sh):
 *   - no torn version is accepted: a reader that accepts version v read v's data in both halves;
 *   - versions never go backwards for a reader;
 *   - no lost wake-up: no end state leaves the sleeper asleep (spin's invalid-end-state check)
 *     once the writer is done;
 * and two known-bad variants must be caught: -DWAKER_CLEARS (the waker, not the waiter, clears
 * the "asleep" mark: a lost wake-up) and -DNO_RECHECK (a reader that does not re-check the slot's
 * sequence after its copy: a torn version accepted).
 *
 * Memory is sequentially consistent here: the real code's seq_cst pair (futexWord increment,
 * then the sleepers load; sleepers increment, then the latestVersion load) is modelled exactly;
 * the acquire/release ordering of the seqlock is modelled as the program order it guarantees. */

#ifndef SLOTS
#define SLOTS 2
#endif
#ifndef MAXV
#define MAXV 3
#endif
#define CRASHES 1

byte latest = 0;            /* latestVersion */
byte seq[SLOTS];            /* each slot's sequence (0: being written) */
byte lo[SLOTS];             /* a version's data, written in two halves */
byte hi[SLOTS];
byte futexWord = 0;
byte sleepers = 0;          /* the wait board */
bool asleep = false;        /* the sleeper is inside FUTEX_WAIT */
bool writerDone = false;

inline wakeAll() {
    asleep = false          /* FUTEX_WAKE of every waiter */
}

active proctype Writer() {
    byte v, s, crashes = 0;
publish:
    do
    :: latest < MAXV ->
        v = latest + 1;
        s = v % SLOTS;
        seq[s] = 0;
        if :: crashes < CRASHES -> crashes++; goto restart :: true fi;
        lo[s] = v;
        if :: crashes < CRASHES -> crashes++; goto restart :: true fi;
        hi[s] = v;
        seq[s] = v;
        latest = v;
        if :: crashes < CRASHES -> crashes++; goto restart :: true fi;
        futexWord = futexWord + 1;
#ifdef WAKER_CLEARS
        atomic { if :: sleepers > 0 -> wakeAll(); sleepers = 0 :: else -> skip fi }
#else
        if :: sleepers > 0 -> wakeAll() :: else -> skip fi
#endif
    :: else -> break
    od;
    writerDone = true;
    goto done;
restart:
    /* A new owner process takes the segment back: it continues from latestVersion, and its
     * timer's backstop wakes every waiter on a segment that changed. */
    wakeAll();
    goto publish;
done:
    skip
}

proctype Reader() {
    byte v, s, a, b, seen = 0, reads = 0;
    do
    :: reads < 2 ->
        v = latest;
        if
        :: v == 0 -> reads++
        :: v != 0 ->
            s = v % SLOTS;
            if
            :: seq[s] != v -> skip                  /* overwritten already: retry */
            :: seq[s] == v ->
                a = lo[s];
                b = hi[s];
                if
#ifdef NO_RECHECK
                :: true ->
#else
                :: seq[s] == v ->
#endif
                    assert(a == v && b == v);       /* no torn version accepted */
                    assert(v >= seen);              /* versions never go backwards */
                    seen = v;
                    reads++
                :: else -> skip                     /* the writer reused the slot: retry */
                fi
            fi
        fi
    :: reads >= 2 -> break
    od
}

proctype Sleeper() {
    byte w;
#ifdef WAKER_CLEARS
    sleepers = 1;                                   /* marked once; the waker clears the mark */
#else
    sleepers = sleepers + 1;                        /* counted before the loop (seq_cst) */
#endif
    do
    :: w = futexWord;
       if
       :: latest > 1 -> break                       /* the version it waits for exists */
       :: else ->
           atomic {                                  /* FUTEX_WAIT: sleeps only if unchanged */
               if :: futexWord == w -> asleep = true :: else -> skip fi
           };
           (asleep == false)                         /* until a FUTEX_WAKE */
       fi
    od;
#ifndef WAKER_CLEARS
    sleepers = sleepers - 1
#endif
}

init {
    atomic { run Reader(); run Reader(); run Sleeper() }
}
