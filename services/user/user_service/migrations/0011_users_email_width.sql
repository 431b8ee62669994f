-- Emails with full-width or half-width forms mapped to the characters they
-- stand for (PRECIS width mapping, RFC 8264 9.3), as validation._composed
-- has done since: "ｊｏｈｎ@example.com", typed through an input method, is
-- "john@example.com". A row stored before may hold the wide spelling: the
-- login, which maps what is typed, no longer finds it, and the unique index
-- on lower(email) lets a second account register its narrow look-alike.
--
-- The two strings below are validation.WIDTH_MAPPING, from and to, in code
-- point order (a test checks they still are). Then NFC, since a half-width
-- voiced mark composes with the kana before it once it is mapped.
--
-- As in 0010: accounts that become one address are named for a person to
-- decide, the migration stops rather than fail on the unique index, and
-- writes wait until it commits. So are addresses that mapping would make no
-- address at all: a full-width "@" passed the old pattern as any other
-- character, and mapped it is a second "@". The function lives for this
-- session only.
LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;
CREATE OR REPLACE FUNCTION pg_temp.width_mapped(email text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN normalize(translate(email, '　！＂＃＄％＆＇（）＊＋，－．／０１２３４５６７８９：；＜＝＞？＠ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ［＼］＾＿｀ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ｛｜｝～｟｠｡｢｣､･ｦｧｨｩｪｫｬｭｮｯｰｱｲｳｴｵｶｷｸｹｺｻｼｽｾｿﾀﾁﾂﾃﾄﾅﾆﾇﾈﾉﾊﾋﾌﾍﾎﾏﾐﾑﾒﾓﾔﾕﾖﾗﾘﾙﾚﾛﾜﾝﾞﾟﾠﾡﾢﾣﾤﾥﾦﾧﾨﾩﾪﾫﾬﾭﾮﾯﾰﾱﾲﾳﾴﾵﾶﾷﾸﾹﾺﾻﾼﾽﾾￂￃￄￅￆￇￊￋￌￍￎￏￒￓￔￕￖￗￚￛￜ￠￡￢￣￤￥￦￨￩￪￫￬￭￮', ' !"#$%&''()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefghijklmnopqrstuvwxyz{|}~⦅⦆。「」、・ヲァィゥェォャュョッーアイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワン゙゚ㅤㄱㄲㄳㄴㄵㄶㄷㄸㄹㄺㄻㄼㄽㄾㄿㅀㅁㅂㅃㅄㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎㅏㅐㅑㅒㅓㅔㅕㅖㅗㅘㅙㅚㅛㅜㅝㅞㅟㅠㅡㅢㅣ¢£¬¯¦¥₩│←↑→↓■○'), NFC);
DO $$
DECLARE
    collisions text;
    unusable text;
BEGIN
    SELECT string_agg(ids, '; ' ORDER BY ids) INTO collisions
    FROM (
        SELECT string_agg(id::text, ', ' ORDER BY id) AS ids
        FROM users
        GROUP BY lower(pg_temp.width_mapped(email))
        HAVING count(*) > 1
    ) AS one_address;
    IF collisions IS NOT NULL THEN
        RAISE EXCEPTION 'emails of different accounts are one address once their widths are mapped; user ids: %', collisions
            USING HINT = 'Change the email of, or delete, all but one account of each group, then start again.';
    END IF;
    -- validation.EMAIL, which every address passed when it was stored.
    SELECT string_agg(id::text, ', ' ORDER BY id) INTO unusable
    FROM users
    WHERE email <> pg_temp.width_mapped(email)
        AND pg_temp.width_mapped(email) !~ '^[^@\s]+@[^@\s]+\.[^@\s]+$';
    IF unusable IS NOT NULL THEN
        RAISE EXCEPTION 'emails that are no longer an address once their widths are mapped; user ids: %', unusable
            USING HINT = 'Change the email of, or delete, each of these accounts, then start again.';
    END IF;
END
$$;
UPDATE users SET email = pg_temp.width_mapped(email) WHERE email <> pg_temp.width_mapped(email);
DROP FUNCTION pg_temp.width_mapped(text);
