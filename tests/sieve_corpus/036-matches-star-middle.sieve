# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :matches "subject" "*report*important*" {
  fileinto "yes";
} else {
  fileinto "no";
}
