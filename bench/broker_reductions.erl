%% Where a RabbitMQ node spends its work, by kind of process: every Seconds, the reductions
%% each process made since the reading before, summed by its registered name or the function
%% it was started with (a connection's reader, a channel, a classic queue's process, one of the
%% management plugin's metrics collectors...), the 14 largest appended to File, N readings.
%% Compiled and loaded into the running node, so the sampling costs little (the same loop
%% through `rabbitmqctl eval`, interpreted, took more of the broker than a 10,000-cell rollout):
%%
%%   erlc -o /tmp bench/broker_reductions.erl && chmod 644 /tmp/broker_reductions.beam
%%   rabbitmqctl eval '{ok, B} = file:read_file("/tmp/broker_reductions.beam"),
%%     code:load_binary(broker_reductions, "/tmp/broker_reductions.beam", B),
%%     broker_reductions:run(50, 10, "/tmp/reductions.log").'
%%
%% File must be writable by the broker's user. Figures are millions of reductions.
-module(broker_reductions).
-export([run/3]).

run(N, Seconds, File) ->
    spawn(fun() -> loop(N, Seconds, File, snapshot()) end),
    started.

snapshot() ->
    maps:from_list([{P, R} || P <- erlang:processes(),
                              {reductions, R} <- [erlang:process_info(P, reductions)]]).

kind(P) ->
    case erlang:process_info(P, registered_name) of
        {registered_name, Name} when is_atom(Name) -> Name;
        _ -> started_with(P)
    end.

started_with(P) ->
    case erlang:process_info(P, dictionary) of
        {dictionary, D} ->
            case lists:keyfind('$initial_call', 1, D) of
                {_, {M, F, _}} -> {M, F};
                false ->
                    case erlang:process_info(P, initial_call) of
                        {initial_call, {M, F, _}} -> {M, F};
                        _ -> gone
                    end
            end;
        _ -> gone
    end.

loop(0, _, _, _) -> ok;
loop(N, Seconds, File, Before) ->
    timer:sleep(Seconds * 1000),
    After = snapshot(),
    Sums = maps:fold(fun(P, R, Acc) ->
                             D = R - maps:get(P, Before, 0),
                             maps:update_with(kind(P), fun(V) -> V + D end, D, Acc)
                     end, #{}, After),
    Top = lists:sublist(lists:reverse(lists:keysort(2, maps:to_list(Sums))), 14),
    Line = io_lib:format("~s total=~b ~w~n",
                         [calendar:system_time_to_rfc3339(erlang:system_time(second)),
                          lists:sum(maps:values(Sums)) div 1000000,
                          [{K, V div 1000000} || {K, V} <- Top]]),
    ok = file:write_file(File, Line, [append]),
    loop(N - 1, Seconds, File, After).
